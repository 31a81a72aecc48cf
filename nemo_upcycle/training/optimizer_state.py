"""Resuming the optimizer at another layout: what can be resumed, and EP>1 <-> EP1.

:func:`check_optimizer_matches_checkpoint` refuses, before anything is built, what cannot
resume (the other optimizer; NeMo's DP-only format at another model-parallel layout).

megatron-core builds its optimizer from parameter groups keyed by (wd_mult, lr_mult,
is_expert_parallel, is_decoupled_lr). Expert weights are "expert parallel" only when
EP > 1 (``tensor_parallel/layers.py:878``, ``allreduce = not (is_expert and
expert_parallel)``), and ``get_megatron_optimizer`` then gives them an optimizer of their own
(``optimizer/__init__.py:618``): at EP > 1 the optimizer is a ChainedOptimizer of two (dense,
experts), at EP1 it is one. The tensors of Adam's state are saved under layout-free keys
(``optimizer.state.exp_avg.<parameter>``) and reshard, but the small common part (each
optimizer's param groups and step) is saved per optimizer, in the chain's structure. Loading
it into the other structure leaves param groups holding only their ``params``, and megatron
fails matching them: ``KeyError: 'pre_wd_mult'`` (``optimizer.py:409``) from EP2 to EP1, and
``RuntimeError: Expected 2 entries in state dict`` (``optimizer.py:1218``) from EP1 to EP2.

:func:`fit_optimizer_state` rebuilds the loaded state in the current structure: the loaded
tensors stay where the current optimizer asked for them, and each current param group takes
the saved group with the same key (the expert group, which exists on one side only, takes
the dense group of the same wd/lr multipliers: the same hyper-parameters).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron.core.optimizer.optimizer import param_group_identifier_keys

from nemo_upcycle.checkpoint.sources.nemo2_context import model_config
from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel

_EXPERT_KEY = param_group_identifier_keys.index("is_expert_parallel")


def fit_optimizer_state(mcore_optimizer: Any, state: dict) -> dict:
    """``state`` as loaded for ``mcore_optimizer`` (megatron's optimizer), in its structure."""
    subs = list(getattr(mcore_optimizer, "chained_optimizers", [mcore_optimizer]))
    chained = sorted(k for k in state if isinstance(k, int))
    single = {k: v for k, v in state.items() if not isinstance(k, int)}
    if (len(subs) == 1 and not chained) or (len(subs) > 1 and not single):
        return state  # saved in the structure it is loaded into
    if len(subs) == 1:  # saved at EP > 1 (dense + experts), loaded into one optimizer
        templates, saved = [single], [state[k] for k in chained]
    else:  # saved at EP1, loaded into dense + experts
        templates, saved = [state[k] for k in chained], [single]
    if len(templates) != len(subs):
        raise RuntimeError(f"the checkpoint's optimizer state has {len(templates)} parts, this layout's "
                           f"optimizer has {len(subs)}")
    fitted = [_fit(sub, template, saved) for sub, template in zip(subs, templates)]
    return fitted[0] if len(subs) == 1 else dict(enumerate(fitted))


def _fit(sub: Any, template: dict, saved: list[dict]) -> dict:
    result = _merge(saved[0], template)
    pool = [g for s in saved for g in (_groups_holder(s) or {}).get("param_groups", [])]
    stubs = (_groups_holder(template) or {}).get("param_groups")
    groups = []
    for i, current in enumerate(sub.optimizer.param_groups):
        key = _group_key(current)
        match = next((g for g in pool if _group_key(g) == key), None) or next(
            (g for g in pool if _without_expert(_group_key(g)) == _without_expert(key)), None)
        if match is None:
            raise RuntimeError(f"the checkpoint's optimizer has no parameter group like this layout's {key} "
                               f"(keys {param_group_identifier_keys}); saved: {[_group_key(g) for g in pool]}")
        group = {**match, "is_expert_parallel": current["is_expert_parallel"]}
        if stubs is not None:
            group["params"] = stubs[i]["params"]
        groups.append(group)
    _groups_holder(result, create=True)["param_groups"] = groups
    return result


def _groups_holder(state: dict, create: bool = False):
    """The dict holding ``param_groups``: the state itself (fp32 optimizer) or its ``optimizer``
    entry (mixed-precision and distributed optimizers)."""
    if "param_groups" in state:
        return state
    inner = state.get("optimizer")
    if isinstance(inner, dict) and ("param_groups" in inner or create):
        return inner
    if create:
        return state
    return None


def _group_key(group: dict) -> tuple:
    return tuple(group[k] if k in group else group[f"pre_{k}"] for k in param_group_identifier_keys)


def _without_expert(key: tuple) -> tuple:
    return key[:_EXPERT_KEY] + key[_EXPERT_KEY + 1:]


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def check_optimizer_matches_checkpoint(cfg: Any, checkpoint: Path) -> None:
    """A checkpoint's optimizer state resumes at any parallel layout (the distributed
    optimizer's is saved fully reshardable), but only with the optimizer that wrote it: the
    distributed optimizer's state (with its fp32 main params, under other keys) and the plain
    one's are different formats, and NeMo cannot convert one into the other (it fails while
    restoring: ``KeyError: 'pre_wd_mult'`` one way, a missing ``optimizer.state.exp_avg.*``
    tensor the other)."""
    from nemo.lightning.io.pl import MegatronCheckpointIO

    from nemo_upcycle.training.preflight import PreflightError

    meta = MegatronCheckpointIO.load_content_metadata(checkpoint) or {}
    saved = meta.get("distrib_optim_sharding_type", "fully_sharded_model_space") != "fully_sharded_model_space"
    if saved != bool(cfg.trainer.distributed_optimizer):
        raise PreflightError(
            f"{checkpoint} was saved with trainer.distributed_optimizer={str(saved).lower()} and this run sets "
            f"trainer.distributed_optimizer={str(bool(cfg.trainer.distributed_optimizer)).lower()}: the optimizer's "
            f"state cannot be converted between the two. Resume with "
            f"trainer.distributed_optimizer={str(saved).lower()} (any parallel layout works), or train into a new log_dir."
        )
    if meta.get("distrib_optim_sharding_type") == "dp_reshardable":  # NeMo's default format, not written here
        saved_layout, layout = _saved_layout(checkpoint), _layout(cfg)
        changed = {k: (saved_layout[k], v) for k, v in layout.items() if k in saved_layout and saved_layout[k] != v}
        if changed:
            raise PreflightError(
                f"{checkpoint} holds a distributed optimizer state in NeMo's DP-only reshardable format, which "
                f"cannot load at another model-parallel layout ({', '.join(f'parallel.{k}: saved {a}, now {b}' for k, (a, b) in changed.items())}). "
                f"Resume at the saved layout: the checkpoints this job writes are fully reshardable and resume "
                f"at any layout."
            )


_LAYOUT_KEYS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                "context_parallel_size": "cp", "expert_model_parallel_size": "ep", "expert_tensor_parallel_size": "etp"}


def _layout(cfg: Any) -> dict:
    par = cfg.parallel
    return {"tp": par.tp, "pp": par.pp, "cp": par.cp, "ep": par.ep, "etp": expert_tensor_parallel(par)}


def _saved_layout(checkpoint: Path) -> dict:
    """The parallel sizes in the checkpoint's model config (``context/model.yaml``)."""
    config = model_config(Path(checkpoint) / "context") or {}
    out = {name: config[key] for key, name in _LAYOUT_KEYS.items() if key in config}
    if "etp" in out and out["etp"] is None:
        out["etp"] = out.get("tp")
    return out
