"""cryohet: continuous-heterogeneity analysis for cryo-EM (engine + Scipion plugin + RELION External jobs)."""
from pathlib import Path

from setuptools import find_packages, setup

#: One RELION 5 / CCP-EM pipeliner job type per method module (cryohet/methods/<name>.py, as the method registry
#: finds them: all but base and _*); cryohet.pipeliner_jobs makes each class from the module's METHOD.
PIPELINER_JOBS = [f"cryohet.{p.stem} = cryohet.pipeliner_jobs:{p.stem}"
                  for p in sorted(Path(__file__).resolve().parent.joinpath("cryohet", "methods").glob("*.py"))
                  if p.stem != "base" and not p.stem.startswith("_")]

setup(
    name="cryohet",
    version="0.1.0",
    description="Continuous-heterogeneity analysis for cryo-EM single-particle data",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.10",
    packages=find_packages(include=["cryohet", "cryohet.*", "cryohet_plugin", "cryohet_plugin.*"]),
    package_data={"cryohet": ["data/*.pdb", "data/*.cif"], "cryohet_plugin": ["protocols.conf"]},
    scripts=["bin/cryohet_external"],
    # The engine's dependencies, unpinned: it runs on the newest releases (numpy 2.x) as well as on the older
    # set Scipion pins. The Makefile builds one environment of each kind and tests in both (README, Set-up).
    install_requires=[
        "numpy>=1.26.1",
        "scipy>=1.10",
        "matplotlib>=3.8",
        "torch",
        "mrcfile>=1.4",
        "starfile",
        "emtable",
        "pyarrow",
        "gemmi",
        "prody",  # elastic-network modes (cryohet nma)
        "MDAnalysis",  # MD trajectories (DCD, XTC) for ensemble reweighting
        "scikit-learn",
        "umap-learn",
        "tqdm",
        "safetensors",
        "cryosparc-tools",
    ],
    extras_require={
        # Scipion and the versions of the engine's dependencies that install together with it (see
        # shared/docs/HOSTS.md): scipion-pyworkflow pins numpy, matplotlib and scipy, scipion-em caps mrcfile,
        # and pyarrow 26 needs numpy 2. Install as  pip install -e ".[scipion]"  into Scipion's environment.
        "scipion": [
            "scipion-pyworkflow",
            "scipion-em",
            "scipion-em-relion",
            "scipion-app",  # Scipion's installer (scipion3 installb cryohet: the engine's own environment)
            # Scipion's flexibility tools that take our particles with latents (tests/test_scipion_flexutils.py);
            # flexutils' protocols import scipion-em-xmipp's.
            "scipion-em-flexutils",
            "scipion-em-cryodrgn",
            "scipion-em-xmipp",
            "numpy==1.26.1",
            "scipy<=1.10.0",
            "matplotlib==3.8.1",
            "mrcfile<=1.4.3",
            "pyarrow<26",
        ],
        "test": ["pytest", "ruff"],
        # RELION 5's job runner (needs numpy 2: installed beside the engine's newest releases, not Scipion's pins).
        "relion5": ["ccpem-pipeliner"],
    },
    entry_points={
        "console_scripts": ["cryohet = cryohet.cli:main"],
        "pyworkflow.plugin": ["cryohet_plugin = cryohet_plugin"],
        "ccpem_pipeliner.jobs": PIPELINER_JOBS,
    },
)
