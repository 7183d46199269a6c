"""Compiling the Triton kernels for a Hopper GPU (sm_90) on a machine without one.

Triton's wheel ships its CUDA backend with ptxas, cuobjdump and nvdisasm, so a kernel that would not compile
for the GPU, that spills registers, or whose loads are not where its design puts them (before or after a
programmatic-dependent-launch wait) is found by the CPU tests instead of by a GPU run. The launchers in kernels/
run as they are, on CPU tensors of the real shapes; inside `compiling_for_sm90()` each launch is compiled with
Triton's own argument specialisation (as JITFunction.run would for a CUDA tensor) and not run, so the launchers'
outputs are left unwritten.

    with compiling_for_sm90() as kernels:
        launch_gemv_partials(x, w, out, 2, 16, 256, 4)          # CPU tensors
    k = kernels[0]; k.name, k.registers, k.spilled, k.loads_before_wait()
"""
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

from kernels.launch import triton

TOOLS = None if triton is None else os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sm90_tools_available():
    """Triton with its bundled ptxas, cuobjdump and nvdisasm (every Linux x86-64 wheel of Triton 3.x)."""
    return TOOLS is not None and all(os.path.exists(os.path.join(TOOLS, t)) for t in ("ptxas", "cuobjdump",
                                                                                        "nvdisasm"))


@dataclass
class CompiledKernel:
    name: str
    constexprs: dict
    num_warps: int
    registers: int        # per thread
    local_bytes: int      # per thread: registers spilled to local memory
    stack_bytes: int
    shared_bytes: int     # per program, as the launch asks for it
    sass_lines: list = field(default_factory=list)

    @property
    def spilled(self):
        return self.local_bytes > 0 or self.stack_bytes > 0

    def _wait_line(self):
        # griddepcontrol.wait is ACQBULK in Hopper SASS
        waits = [i for i, line in enumerate(self.sass_lines) if re.search(r"\bACQBULK\b", line)]
        return waits[0] if waits else None

    def has_wait(self):
        return self._wait_line() is not None

    def loads_before_wait(self):
        """Global loads (LDG) issued before the first programmatic-dependent-launch wait, in the final SASS."""
        wait = self._wait_line()
        if wait is None:
            return 0
        return sum(1 for line in self.sass_lines[:wait] if re.search(r"\bLDG\b", line))


def _tool(name, *args):
    return subprocess.run([os.path.join(TOOLS, name), *args], capture_output=True, text=True, check=True).stdout


def _inspect(name, constexprs, compiled):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _tool("cuobjdump", "--dump-resource-usage", path)
        sass = _tool("nvdisasm", path)
    stat = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return CompiledKernel(name, constexprs, compiled.metadata.num_warps, stat["REG"], stat["LOCAL"], stat["STACK"],
                          compiled.metadata.shared, sass.splitlines())


@contextlib.contextmanager
def compiling_for_sm90(pdl=True, arch=90):
    """Within it, every Triton launch compiles for sm_90 (or sm_<arch>) instead of running; yields the list of
    CompiledKernels, one per launch, in order. pdl: kernels with a PDL constexpr are compiled with it on (as
    launch_options sets it on Hopper), whatever the launcher passed on this CPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    compiled = []

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kwargs.pop("launch_pdl", None)  # a launch option, not a compile option
        if pdl and any(p.name == "PDL" for p in self.params):
            kwargs["PDL"] = True
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        named = {self.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
        compiled.append(_inspect(self.__name__, named, kernel))
        return kernel

    saved = jit.JITFunction.run
    jit.JITFunction.run = compile_instead
    try:
        yield compiled
    finally:
        jit.JITFunction.run = saved
