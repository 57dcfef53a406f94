"""Stage 4, deploy: act on stage 3's decision (promote or reject), then show what serves and
explain one transaction with the champion's Shapley values."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from fraudlib.stages import base
from fraudlib.stages.base import param


class PromotionRolledBack(RuntimeError):
    """The promoted model failed its health check; the previous champion serves again."""


@dataclass(frozen=True)
class Params(base.StageParams):
    decision: str = param("", "promote or reject (glued by stage 3); empty: the decision stage 3 logged for the staged challenger, if any",
                          choices=("", "promote", "reject"))
    challenger_version: int = param(0, "Triton version staged by stage 3", lambda v: v >= 0, ">= 0")
    registry_version: int = param(0, "registry version of the challenger (stage 3)", lambda v: v >= 0, ">= 0")
    example_graph_dir: str = param("", "graph whose test edges give the example transaction; empty: the champion's own graph")
    triton_url: str = param("", "Triton server host:port; empty: $TRITON_URL, else an embedded server started here")
    run_dir: str = param("", "run folder (set by run_pipeline.py); empty: runs/scratch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decision and not (self.challenger_version and self.registry_version):
            raise base.StageParameterError(f"deploy: decision {self.decision!r} needs the challenger_version and "
                                           "registry_version stage 3 staged (both > 0)")


@dataclass(frozen=True)
class Outputs:
    champion_version: int  # Triton version serving afterwards (0: none)
    deploy_action: str | None = None  # promote, reject or rolled-back; None: no decision to act on
    versions: list = field(default_factory=list, metadata={"glue": False})  # Triton's repository index
    registry: list = field(default_factory=list, metadata={"glue": False})  # registry versions, rows
    example: str = field(default="", metadata={"glue": False})  # the explained transaction, in words
    plots: dict = field(default_factory=dict, metadata={"glue": False})
    summary: str = field(default="", repr=False, metadata={"glue": False})


def run(params: Params) -> Outputs:
    from fraudlib import lifecycle, plots, registry, scoring
    from fraudlib.triton_server import connect_or_start

    run_dir = base.run_folder(params.run_dir)
    decision, challenger, registry_version = params.decision, params.challenger_version, params.registry_version
    with contextlib.ExitStack() as services:  # the given server, else $TRITON_URL, else our own
        client = services.enter_context(connect_or_start(params.triton_url or os.environ.get("TRITON_URL"),
                                                         run_dir / "triton.log"))
        acted_on = "stage 3's decision"
        if not decision and (pending := lifecycle.pending_decision(client)):
            decision, challenger, registry_version = pending
            acted_on = f"the decision stage 3 logged for Triton version {challenger} (stage 4 run alone)"
        deployment = lifecycle.deploy(decision, challenger, registry_version, client) if decision else None
        if deployment is None:
            lifecycle.reconcile(client)
        state = lifecycle.repository(client).state()
        versions = client.repository_index()
        example = scoring.explain_example(client, params.example_graph_dir or None, run_dir) \
            if state.champion else None
    rows = [{"version": v.version, "triton_version": v.triton_version, "aliases": ", ".join(v.aliases),
             "run_id": v.run_id, "data_manifest": (v.manifest_hash or "")[:12]} for v in registry.versions()]
    champion = registry.champion()
    plot_paths, words = {}, ""
    if example is not None:
        fig = plots.shapley_bars(example.shapley, example.group_names)
        plot_paths["shapley"] = plots.save(fig, run_dir / "plots" / "deploy_shapley.png")
        plots.close(fig)
        words = (f"edge {example.edge} (card node {example.user}, merchant node {example.merchant}): fraud "
                 f"probability {example.score:.4f}, label {'fraud' if example.label else 'legit'}; "
                 f"context: {example.context_edges} edges"
                 + (f" (a uniform sample of its {example.receptive_field:,}-edge receptive field, cut to the "
                    "explanation cap)" if example.receptive_field > example.context_edges else ""))
    if deployment is None:
        outcome = f"nothing deployed: no decision to act on; Triton version {state.champion} serves"
    else:
        outcome = (f"{deployment.action}: Triton serves version {deployment.champion_version}, registry champion "
                   f"is version {deployment.registry_champion} ({deployment.health})")
    details = [("acted on", acted_on if deployment else "nothing"),
               ("serving", f"Triton version {state.champion}; staged challenger: {state.challenger}; "
                           f"archived: {list(state.archived)}")]
    text = base.summary("04 deploy", run_dir, champion.manifest_hash if champion else None, outcome, details)
    return Outputs(champion_version=state.champion or 0, deploy_action=deployment.action if deployment else None,
                   versions=versions, registry=rows, example=words, plots=plot_paths, summary=text)


def check_served(outputs: Outputs) -> None:
    """Raises when the promotion was rolled back: the stage failed, though a champion serves."""
    from fraudlib import lifecycle

    if outputs.deploy_action == lifecycle.ROLLED_BACK:
        raise PromotionRolledBack(f"promotion rolled back; version {outputs.champion_version} serves")
