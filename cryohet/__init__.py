"""cryohet: continuous-heterogeneity analysis for cryo-EM single-particle data."""
__version__ = "0.1.0"
