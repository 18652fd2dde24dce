"""cryohet: continuous-heterogeneity analysis for cryo-EM (engine + Scipion plugin + RELION External jobs)."""
from setuptools import find_packages, setup

setup(
    name="cryohet",
    version="0.1.0",
    description="Continuous-heterogeneity analysis for cryo-EM single-particle data",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.10",
    packages=find_packages(include=["cryohet", "cryohet.*", "cryohet_plugin", "cryohet_plugin.*"]),
    package_data={"cryohet": ["data/*.pdb", "data/*.cif"]},
    scripts=["bin/cryohet_external"],
    install_requires=[
        # Versions that install together with scipion-pyworkflow/scipion-em (see shared/docs/HOSTS.md).
        "numpy==1.26.1",
        "scipy<=1.10.0",
        "matplotlib==3.8.1",
        "torch==2.13.0",
        "mrcfile<=1.4.3",
        "starfile",
        "emtable",
        "pyarrow<26",
        "gemmi",
        "scikit-learn",
        "umap-learn",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "scipion": ["scipion-pyworkflow", "scipion-em", "scipion-em-relion"],
        "test": ["pytest", "ruff"],
    },
    entry_points={
        "console_scripts": ["cryohet = cryohet.cli:main"],
        "pyworkflow.plugin": ["cryohet_plugin = cryohet_plugin"],
    },
)
