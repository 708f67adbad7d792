"""The lab: the study built on the tutorial (baselines, ablations of the author's PRISM, our
earlier reconstruction and its white-box variants, the comparison, its records). Importing it
registers its architectures in model.ARCHS; model.get_arch imports it on the first arch name the
tutorial does not know (the one hook from the tutorial into the lab)."""
import model
from lab import baselines  # noqa: F401  (registers gpt2, gemma3, rope-attention)
from lab.ablations import AblationConfig, PrismAblation
from lab.reconstruction import Reconstruction, ReconstructionConfig
from lab.sandwich import PrismWhiteSandwich, SandwichConfig
from lab.white import PrismWhite, WhiteConfig

model.ARCHS["prism-ablation"] = (AblationConfig, PrismAblation)
model.ARCHS["recon"] = (ReconstructionConfig, Reconstruction)
model.ARCHS["prism-white"] = (WhiteConfig, PrismWhite)
model.ARCHS["prism-white-sandwich"] = (SandwichConfig, PrismWhiteSandwich)
