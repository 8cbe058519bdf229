"""`python -m fedcmp.client` (and `torchrun ... -m fedcmp.client`): the client daemon, as `fedcmp-client`."""
from fedcmp.client.cli import main

raise SystemExit(main())
