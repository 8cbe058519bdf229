"""Backbone identity at admission: a client joins only with the run's vision tower and LM.

Equal projector shapes do not make equal models: another vision tower of the same width
(different weights, another patch count) would train a different projector. So each client
sends the fingerprints of its backbone files, and the coordinator compares them with the run's:
the recipe's pins when it has them, else those most live registrants share when round 1 opens
(fedcmp.server.admission; kept in the commit record, so after the first commit a restarted
coordinator keeps refusing the same clients).
"""
from __future__ import annotations

from fedcmp.common.provenance import Backbones, short
from fedcmp.common.recipe import Recipe


def run_backbones(recipe: Recipe, chosen: Backbones) -> Backbones:
    """The run's identity: the recipe's names, its pins where set, else the chosen client's fingerprints."""
    return Backbones(vision_model=recipe.vision_model, llm=recipe.llm,
                     vision_fingerprint=recipe.vision_fingerprint or chosen.vision_fingerprint,
                     llm_fingerprint=recipe.llm_fingerprint or chosen.llm_fingerprint)


def backbone_refusal(client_id: str, client: Backbones, run: Backbones | None, recipe: Recipe) -> str:
    """Why `client` may not join (empty: it may), naming the client's and the run's fingerprints."""
    if not client.vision_fingerprint or not client.llm_fingerprint:
        return (f"client {client_id} sent no backbone fingerprints; this coordinator admits only clients that "
                "prove which backbones they loaded (upgrade fedcmp-client)")
    for kind, theirs, name, pinned, fixed in (
            ("vision tower", client.vision_fingerprint, client.vision_model, recipe.vision_fingerprint,
             run.vision_fingerprint if run else ""),
            ("LLM", client.llm_fingerprint, client.llm, recipe.llm_fingerprint, run.llm_fingerprint if run else "")):
        expected = pinned or fixed
        if expected and theirs != expected:
            source = "pinned by the recipe" if pinned else "chosen when round 1 opened"
            return (f"backbone mismatch: client {client_id}'s {kind} {name!r} has fingerprint {short(theirs)} but the "
                    f"run's is {short(expected)} ({source}); load the backbone files the run uses "
                    f"(vision_model={recipe.vision_model!r}, llm={recipe.llm!r})")
    return ""
