"""Planning a run: which peers run here (each probed on tiny inputs first), on which input models, and the
configurations (shape × input model × dtype) the options ask for."""

from __future__ import annotations

import warnings

import torch

from .case import Case, Config, Options, Peer, first_line

__all__ = ["configs", "known_peer_names", "peers_for_model", "plan_peers"]


def _probe(case: Case, peer: Peer, device: str, dtype: torch.dtype, seed: int) -> str | None:
    """None if ``peer`` runs a tiny forward+backward here, else why not."""
    try:
        inputs = case.make_inputs(case.probe_shape, (peer.models or case.models)[0], dtype, device, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer.build()(*inputs.args).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:
        return first_line(exc)
    return None


def plan_peers(case: Case, device: str, dtype: torch.dtype, wanted: list[str] | None, seed: int = 0):
    """(runnable peers, {skipped name: reason}) for ``case`` on ``device`` in ``dtype``."""
    peers = case.peers(device, dtype)
    if wanted is not None:
        peers = [p for p in peers if p.name in wanted]
    skipped: dict[str, str] = {}
    ok: list[Peer] = []
    for p in peers:
        reason = p.skip or (None if not p.probe else _probe(case, p, device, dtype, seed))
        if reason is None and p.build is None:
            reason = "no implementation"
        if reason is None:
            ok.append(p)
        else:
            skipped[p.name] = reason
    ok_names = {p.name for p in ok}
    runnable = []
    for p in ok:
        if p.stands_in_for in ok_names and not (wanted and p.name in wanted):
            continue  # the peer it stands in for runs
        runnable.append(p)
    for name in list(skipped):
        # a stand-in that was not needed is not worth a "skipped" line
        stand_in = next((p for p in peers if p.name == name), None)
        if stand_in and stand_in.stands_in_for in ok_names and not (wanted and name in wanted):
            del skipped[name]
    return runnable, skipped


def peers_for_model(peers: list[Peer], skipped: dict[str, str], model: str):
    """(peers, skipped) for one input model: a peer limited to other models is skipped, with why."""
    off = {p.name: f"runs on {', '.join(p.models)} inputs only" for p in peers if p.models and model not in p.models}
    return [p for p in peers if p.name not in off], {**skipped, **off}


def known_peer_names(case: Case, device: str) -> list[str]:
    return [p.name for p in case.peers(device, torch.float32)]


def configs(case: Case, opts: Options) -> list[Config]:
    if opts.shapes:
        shapes = opts.shapes
    elif opts.quick:
        shapes = [case.quick_shape]
    else:
        shapes = case.default_shapes(opts.device)
    for s in shapes:
        if len(s) != len(case.dims):
            raise ValueError(f"{case.op} shapes have {len(case.dims)} entries ({','.join(case.dims)}); got {s}")
    models = opts.models or list(case.default_models)
    for m in models:
        if m not in case.models:
            raise ValueError(f"{case.op} has no input model {m!r}; known: {', '.join(case.models)}")
    return [Config(tuple(s), m, d) for d in opts.dtypes for s in shapes for m in models]
