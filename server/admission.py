"""Who may join a run: client ids, one live process per id, the `max_clients` cap, the projector shape.

Every check returns the reason for a refusal ("" to admit), worded so the refused site knows
what to change. The projector shape of a run is fixed

- by the recipe, when it pins `vision_hidden` and `text_hidden` (before anyone registers);
- otherwise by the clients themselves when round 1 starts: the signature (projector shape and
  backbone fingerprints, `signature`) most live registrants share (`majority`). Until a round
  is committed that choice is not final: a resume before the first commit chooses again, so a
  bogus first registrant cannot lock real clients out, neither live nor after `--resume`.

Whatever fixes it, an offer must be the recipe's projector type and hold at most
`max_projector_params` parameters.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from fedcmp.common.projector import describe_shapes, projector_shapes
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.server.liveness import ClientRecord, Shapes, is_live
from fedcmp.server.store import CLIENT_ID_PATTERN

ID_ADVICE = "give each site its own id with fedcmp-client --client-id NAME (the default is the data folder's name)"


def id_refusal(client_id: str) -> str:
    if CLIENT_ID_PATTERN.fullmatch(client_id):
        return ""
    return (f"client id {client_id!r} is not allowed: use letters, digits, '.', '_', '-' (max 128 characters, "
            "starting with a letter or digit)")


def id_in_use(existing: ClientRecord | None, instance_id: str, now: float, timeout_s: float) -> tuple[str, float]:
    """(reason, retry_after_s) when another live process holds the id; ("", 0) to admit.

    The same process registering again (after a coordinator restart or a lost session) and a
    restarted process whose predecessor has gone silent both take the id.
    """
    if existing is None or existing.instance_id == instance_id or not is_live(existing, now, timeout_s):
        return "", 0.0
    retry_after = max(1.0, timeout_s - (now - existing.last_seen))
    return (f"client id {existing.client_id!r} is in use by another live client process (seen "
            f"{now - existing.last_seen:.0f}s ago); {ID_ADVICE}. A restarted client gets the id back once the "
            f"old process has been silent for {timeout_s:g}s", retry_after)


def room_for(clients: dict[str, ClientRecord], client_id: str, max_clients: int | None, now: float,
             timeout_s: float) -> tuple[str, str | None]:
    """Whether a new id fits under `max_clients`: ("", None) yes; ("", gone_id) in the place of the
    longest-silent gone client; (reason, None) no, every place is held by a live client."""
    if max_clients is None or client_id in clients or len(clients) < max_clients:
        return "", None
    gone = [client for client in clients.values() if not is_live(client, now, timeout_s)]
    if gone:
        return "", min(gone, key=lambda client: client.last_seen).client_id
    return f"the run is full: it admits at most {max_clients} clients (recipe max_clients)", None


def pinned_shapes(recipe: Recipe) -> Shapes | None:
    """The projector shapes the recipe fixes by its widths, if it pins them."""
    if recipe.vision_hidden is None or recipe.text_hidden is None:
        return None
    return projector_shapes(recipe.projector_type, vision_hidden=recipe.vision_hidden, text_hidden=recipe.text_hidden)


def offer_refusal(recipe: Recipe, client_id: str, offered: Shapes, fixed: Shapes | None) -> str:
    """Why a client's projector signature cannot join this run ("" when it can)."""
    first = offered.get("linear_1.weight")
    expected = (projector_shapes(recipe.projector_type, vision_hidden=first[1], text_hidden=first[0])
                if first is not None and len(first) == 2 and min(first) >= 1 else None)
    if expected is None:
        return (f"client {client_id} offers projector {describe_shapes(offered) or '(empty)'}, which is not a "
                f"{recipe.projector_type} projector as the recipe asks")
    if expected != offered:
        return (f"projector shape mismatch: the recipe's {recipe.projector_type} projector has "
                f"{describe_shapes(expected)} but client {client_id} has {describe_shapes(offered)}")
    size = sum(math.prod(shape) for shape in offered.values())
    if size > recipe.max_projector_params:
        return (f"client {client_id} offers a projector of {size} parameters; this run admits at most "
                f"{recipe.max_projector_params} (recipe max_projector_params)")
    if fixed is not None and offered != fixed:
        return (f"projector shape mismatch: the coordinator's projector is {describe_shapes(fixed)} but client "
                f"{client_id} has {describe_shapes(offered)}; load the backbones the recipe names "
                f"(vision_model={recipe.vision_model!r}, llm={recipe.llm!r})")
    return ""


Signature = tuple[tuple[tuple[str, tuple[int, ...]], ...], str, str]


def signature(shapes: Shapes, backbones: Backbones | None) -> Signature:
    """What every client of a run shares: the projector shapes and the backbone fingerprints."""
    return (tuple(sorted(shapes.items())), backbones.vision_fingerprint if backbones else "",
            backbones.llm_fingerprint if backbones else "")


def signature_of(client: ClientRecord) -> Signature:
    return signature(client.shapes, client.backbones)


def majority(clients: Iterable[ClientRecord]) -> ClientRecord | None:
    """The earliest of the clients whose signature most of `clients` share (None: no clients)."""
    clients = list(clients)
    counts = Counter(signature_of(client) for client in clients)
    if not counts:
        return None
    common = counts.most_common(1)[0][0]  # ties: the signature seen first
    return next(client for client in clients if signature_of(client) == common)
