"""Builds the `torch-dtr` distribution (import name `dtr`) and its C++ core `dtr._C`.

Install with `pip install --no-build-isolation -e .` so the extension is built
against the torch already installed (build isolation would fetch another one).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("DTR_NO_EXTENSION") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "dtr._C",
            sources,
            extra_compile_args=["-O3", "-std=c++20", "-fvisibility=hidden", "-fno-semantic-interposition", "-fno-plt"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

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
