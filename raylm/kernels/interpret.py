"""Run the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1): how
the tests check them on machines without a GPU.

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit, i.e. when
its module is imported: triton's own standard library (tl.cdiv, tl.max, ...) at
`import triton`, our kernels at `import raylm.kernels.x`. `use_interpreter()` sets the
variable and re-imports whichever of those were imported before it.
"""
from __future__ import annotations

import importlib
import os
import sys

# Triton's modules holding @jit functions, and the package that re-exports them.
_TRITON_JIT_MODULES = ("triton.language.standard", "triton.language.random", "triton.language")


def runs_kernel(device) -> bool:
    """Whether a raylm Triton kernel runs on `device`: on CUDA, or anywhere while Triton's
    interpreter is on (how CPU tests run it); elsewhere the kernel's torch reference does."""
    import torch

    if torch.device(device).type == "cuda":
        return True
    if os.environ.get("TRITON_INTERPRET") == "1":
        _fix_scalar_index()  # a process that inherited the variable, not use_interpreter()
        return True
    return False


def use_interpreter() -> None:
    """Make every raylm kernel run under Triton's interpreter from now on."""
    os.environ["TRITON_INTERPRET"] = "1"
    _fix_scalar_index()
    for name in _TRITON_JIT_MODULES:
        module = sys.modules.get(name)
        if module is not None and _has_compiled_jit(module):
            for to_reload in _TRITON_JIT_MODULES:
                importlib.reload(sys.modules[to_reload])
            break
    for name, module in list(sys.modules.items()):
        if name.startswith("raylm.kernels.") and module is not None and _has_compiled_jit(module):
            importlib.reload(module)


def _has_compiled_jit(module) -> bool:
    from triton.runtime.jit import JITFunction

    return any(isinstance(v, JITFunction) for v in vars(module).values())


def _fix_scalar_index() -> None:
    """numpy >= 2.4 refuses int() of a 1-element array, which the interpreter uses for
    loop bounds held in tensors (triton-lang/triton#9171); apply the upstream fix."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_raylm_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._raylm_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
