"""The dynamo-internals fast path of the compiled decode step, kept apart because it leans on
torch's private API.

`DirectStep` calls the graph that dynamo compiled for `CompiledDecoder._step` as a plain Python
function, bypassing dynamo's frame evaluation for the steps after a generation's first. It reads
dynamo's cache entries (`torch._dynamo.eval_frame._debug_get_cache_entry_list`), checks their guard
managers itself, rebuilds a function from the chosen entry's rewritten bytecode, and watches the
global state dynamo guards on with `torch._C._dynamo.guards.GlobalStateGuard`. None of this is a
public API: on a torch whose internals differ, `select` leaves `fn` None and the compiled decoder
keeps the supported path (dynamo's `skip_guard_eval_unsafe` stance). It is on by default on the
CPU and switched off with `DecodeOptions(direct_calls=False)` (`generate(..., direct_calls=False)`);
tests check both give the same tokens as eager decoding.
"""

from __future__ import annotations

import types

import torch


class DirectStep:
    """The compiled decode step called as a plain function for the rest of a generation.

    Dynamo keeps each graph it compiled for a function as a cache entry: the entry's guards (shapes,
    dtypes, autocast and grad mode, the model's flags and weights) and its code, the function's
    bytecode rewritten to call the graph. After each generation's first, guarded step, `select`
    finds the entry whose guards pass for this decoder and its inputs; the later steps run that
    code directly, without dynamo's frame evaluation (which the `skip_guard_eval_unsafe` stance
    still pays most of), as long as the global state dynamo guards on (grad mode, autocast, default
    dtype, ...) is what it was at the selection (one C++ check a step). Only for a step compiled as
    one graph (no resume functions: a step with a graph break keeps dynamo) under the default stance.
    The entry API is dynamo's internal one, so anything unexpected leaves `fn` None and the caller on
    the stance path."""

    def __init__(self, function):
        self.function = function  # CompiledDecoder._step, whose code object dynamo caches on
        self.fn = self.state = None

    def clear(self) -> None:
        self.fn = self.state = None

    def usable(self) -> bool:
        return self.fn is not None and self.state.check()

    def select(self, decoder, token: torch.Tensor, positions: torch.Tensor) -> None:
        """The cache entry valid for the step's arguments, called directly until the next `select`."""
        self.clear()
        try:
            from torch._C._dynamo.guards import GlobalStateGuard
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list, _stance

            if _stance.stance != "default":  # e.g. force_eager: leave every call to dynamo
                return
            code = self.function.__code__
            f_locals = dict(zip(code.co_varnames[: code.co_argcount], (decoder, token, positions)))
            for entry in _debug_get_cache_entry_list(code):
                if calls_one_graph(entry.code) and entry.guard_manager.check(f_locals):
                    f = self.function
                    self.fn = types.FunctionType(entry.code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
                    self.state = GlobalStateGuard()
                    return
        except Exception:  # noqa: BLE001 - another torch's internals: keep the stance path
            self.clear()


def calls_one_graph(code: types.CodeType) -> bool:
    """Whether dynamo's rewritten bytecode calls exactly one compiled graph and resumes nowhere: its
    resume functions appear as `__resume_at_*` globals, or as nested code objects for a closure."""
    names = code.co_names
    return (
        sum(n.startswith("__compiled_fn") for n in names) == 1
        and not any(n.startswith("__resume_at") for n in names)
        and not any(isinstance(c, types.CodeType) for c in code.co_consts)
    )
