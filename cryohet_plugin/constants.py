"""Names shared by the cryohet Scipion plugin."""

#: Plugin variables (scipion.conf or the environment).
CRYOHET_PYTHON = "CRYOHET_PYTHON"  # the python that has the engine installed (default: Scipion's own)
CRYOHET_ENV_ACTIVATION = "CRYOHET_ENV_ACTIVATION"  # optional shell command run first, e.g. "conda activate cryohet"
CRYOHET_ENGINE_SOURCE = "CRYOHET_ENGINE_SOURCE"  # pip arguments `scipion3 installb cryohet` installs the engine from
#: The Scipion binary (``scipion3 installb cryohet``) and the distribution it pip-installs by default.
ENGINE_PACKAGE = "cryohet"

#: Program name stored in FlexInfo of the particles with latent coordinates.
PROGRAM_NAME = "CryoHet"

#: STAR column holding each particle's Scipion id in the engine's input.
ID_COLUMN = "cryohetScipionId"
#: Column RELION's writer fills with the same id (used when ID_COLUMN is gone).
RELION_ID_COLUMN = "rlnImageId"

#: File names inside a protocol's extra folder.
ENGINE_DIR = "cryohet"          # the engine's output folder (its run record lives here)
INPUT_DIR = "input"             # converted inputs
INPUT_PARTICLES = "input_particles.star"

#: Method parameters the protocol fills itself (from its GPU and thread settings; ``overwrite``: the engine's
#: folder belongs to the protocol, so running it again, e.g. Scipion's continue, replaces the earlier run).
HOST_FILLED = ("device", "threads", "overwrite")

#: Scipion class each input role points at ("run": the output folder of an earlier cryohet protocol).
POINTER_CLASSES = {"particles": "SetOfParticles", "volume": "Volume", "mask": "VolumeMask",
                   "run": "ProtCryohetBase", "atomic_model": "AtomStruct"}
