"""Builds the `torch-dtr` distribution (import name `dtr`) and its C++ core `dtr._C`.

Install with `pip install --no-build-isolation -e .` so the extension is built
against the torch already installed (build isolation would fetch another one).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Note [Profile-guided build]
# Most of what the C++ runtime adds to an op is spent fetching its code: a
# TreeLSTM step runs more distinct code per op than the L1 instruction cache
# holds, so every line of dtr's per-op path is missed again at each op
# (docs/performance.md, "Where the TreeLSTM's added time goes"). GCC's
# profile-guided optimization lays hot paths out straight and moves the rare
# blocks away, so an op touches fewer lines. Measured (docs/performance.md, "A
# profile-guided build"): on the TreeLSTM 7% fewer instructions added per op
# and 12% fewer L1 instruction misses, on a chain of adds 10% fewer
# instructions and about a fifth less added time.
# So with GCC the extension is built twice, as CPython's
# --enable-optimizations does: instrumented, run on csrc/pgo_workload.py (a
# few seconds of small models, with and without a limit), then rebuilt with
# that profile. Code the run did not reach is optimized as without a profile
# (-fprofile-partial-training). DTR_PGO=0 builds once, without a profile (for
# quick rebuilds while developing); a build whose training run fails warns and
# falls back to that.


def _pgo_compiler(compiler_so) -> bool:
    """Whether the C++ compiler is GCC 10 or newer (-fprofile-partial-training)."""
    if not compiler_so:  # MSVC's compiler object has no command line of this kind
        return False
    try:
        version = subprocess.run([compiler_so[0], "--version"], capture_output=True, text=True).stdout
        major = subprocess.run([compiler_so[0], "-dumpversion"], capture_output=True, text=True).stdout
        return "Free Software Foundation" in version and "clang" not in version and int(major.split(".")[0]) >= 10
    except (OSError, ValueError):
        return False


def _without_profile(what_happened: str, details: str = "") -> bool:
    """Says why the training run gave no profile; False, for the build to go on without one."""
    print(f"dtr setup.py: the profile-guided build's training run {what_happened}, so the extension "
          f"is built without a profile (DTR_PGO=0 skips the run)" + (f":\n{details}" if details else ""),
          file=sys.stderr, flush=True)
    return False


ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("DTR_NO_EXTENSION") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class ProfileGuidedBuild(BuildExtension):
        """BuildExtension, twice over with a training run between (Note [Profile-guided build])."""

        def build_extension(self, ext) -> None:
            if os.environ.get("DTR_PGO", "1") == "0" or not _pgo_compiler(getattr(self.compiler, "compiler_so", None)):
                super().build_extension(ext)
                return
            compile_args, link_args = list(ext.extra_compile_args), list(ext.extra_link_args)
            profile = os.path.abspath(os.path.join(self.build_temp, "pgo-profile"))
            shutil.rmtree(profile, ignore_errors=True)  # counts from another build would be added in
            ext.extra_compile_args = compile_args + [f"-fprofile-generate={profile}", "-fprofile-update=atomic"]
            ext.extra_link_args = link_args + [f"-fprofile-generate={profile}"]
            self.force = True  # the second build has the same sources, and would be skipped as up to date
            super().build_extension(ext)
            ext.extra_link_args = link_args
            if self._train(ext, profile):
                ext.extra_compile_args = compile_args + [
                    f"-fprofile-use={profile}", "-fprofile-partial-training", "-Wno-missing-profile"]
            else:
                ext.extra_compile_args = compile_args
            super().build_extension(ext)

        def _train(self, ext, profile: str) -> bool:
            """Runs the workload on the instrumented build; whether it left a profile."""
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    # The package as it will be imported, with the instrumented extension in it.
                    package = os.path.join(tmp, "dtr")
                    shutil.copytree(os.path.join(ROOT, "dtr"), package,
                                    ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd"))
                    built = self.get_ext_fullpath(ext.name)
                    shutil.copy(built, os.path.join(package, os.path.basename(built)))
                    path = os.pathsep.join(filter(None, [tmp, os.environ.get("PYTHONPATH")]))
                    run = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "pgo_workload.py"), package],
                                         cwd=tmp, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
                                         text=True, timeout=1800)  # a few seconds; a hang must not hang the build
            except (OSError, subprocess.SubprocessError) as e:
                return _without_profile(f"could not run ({e})")
            if run.returncode != 0:
                return _without_profile("failed", run.stderr[-4000:])
            if not glob.glob(os.path.join(profile, "**", "*.gcda"), recursive=True):
                return _without_profile("left no profile")
            return True

    ext_modules.append(
        CppExtension(
            "dtr._C",
            sources,
            extra_compile_args=["-O3", "-std=c++20", "-fvisibility=hidden", "-fno-semantic-interposition", "-fno-plt"],
        )
    )
    cmdclass["build_ext"] = ProfileGuidedBuild

setup(
    name="torch-dtr",
    version="0.1.0",
    description="Dynamic Tensor Rematerialization for PyTorch: train under a memory budget",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dtr", "dtr.*"]),
    python_requires=">=3.10",
    # torch is installed first, pinned (pip install torch==2.13.0): the
    # extension is built against it with --no-build-isolation.
    # numpy: torch warns "Failed to initialize NumPy" without it (python -m dtr demo did).
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        # The suite also runs the simulator and the benchmark's quick mode.
        "test": ["pytest", "hypothesis", "expecttest", "numpy", "scipy", "matplotlib", "tqdm"],
        "bench": ["matplotlib", "tqdm", "numpy", "scipy"],
        "sim": ["matplotlib", "tqdm", "numpy", "scipy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "torch_dynamo_backends": ["dtr = dtr.compile:dtr_backend"],
    },
)
