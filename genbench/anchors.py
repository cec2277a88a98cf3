"""Published numbers the claims are read against.

Every number here is quoted from the named table of the named paper. Where we are not certain of a
number we quote none and point at the table instead ("see ... Table N"): an anchor is there to be
checked by a reader, so a wrong number would be worse than no number. The papers' settings
(CIFAR-10, ImageNet, Inception features, 50k samples) differ from ours (small datasets, domain
classifier features, a few thousand samples): anchors give the direction and rough size of an
effect, never a value our runs should reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Anchor:
    key: str
    source: str                 # authors, year, title, arXiv id
    table: str                  # where in the paper
    setting: str                # dataset and protocol of the quoted numbers
    numbers: dict = field(default_factory=dict)   # label -> value as printed in the table (a string)
    note: str = ""              # what the table shows, in words

    def text(self) -> str:
        out = f"{self.source}, {self.table} ({self.setting})"
        if self.numbers:
            out += ": " + "; ".join(f"{k} {v}" for k, v in self.numbers.items())
        if self.note:
            out += ". " + self.note
        return out


DDPM = "Ho, Jain & Abbeel 2020, Denoising Diffusion Probabilistic Models (arXiv:2006.11239)"
DDIM = "Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models (arXiv:2010.02502)"
IDDPM = "Nichol & Dhariwal 2021, Improved Denoising Diffusion Probabilistic Models (arXiv:2102.09672)"
ADM = "Dhariwal & Nichol 2021, Diffusion Models Beat GANs on Image Synthesis (arXiv:2105.05233)"
CFG = "Ho & Salimans 2022, Classifier-Free Diffusion Guidance (arXiv:2207.12598)"
PACGAN = "Lin, Khetan, Fanti & Oh 2018, PacGAN (arXiv:1712.04086)"

ANCHORS: dict[str, Anchor] = {a.key: a for a in (
    Anchor("ddpm_t1", DDPM, "Table 1", "CIFAR-10, unconditional, 1000 sampling steps, L_simple",
           {"FID": "3.17", "IS": "9.46", "NLL bits/dim (test, upper bound)": "3.75"}),
    Anchor("ddpm_t2", DDPM, "Table 2", "CIFAR-10 ablation of the parameterization",
           {}, "predicting epsilon with a learned diagonal variance was unstable to train; with a "
           "fixed isotropic variance and L_simple it gave the paper's best FID (3.17, as in Table 1)"),
    Anchor("ddim_t1", DDIM, "Table 1", "CIFAR-10 FID against sampling steps S, DDIM (eta = 0)",
           {"S=10": "13.36", "S=20": "6.84", "S=50": "4.67", "S=100": "4.16", "S=1000": "4.04"},
           "ancestral DDPM sampling (eta = 1) degrades far faster as S drops; see the same table"),
    Anchor("iddpm", IDDPM, "Sections 3-4, Figure 8", "ImageNet 64x64 and CIFAR-10",
           {}, "learned variances (L_hybrid) keep FID close to full-step quality with 50-100 steps "
           "where fixed variances lose much more; the cosine schedule improves log-likelihood, "
           "while on CIFAR-10 it does not improve FID; see the paper's ablation tables"),
    Anchor("adm_t4", ADM, "Table 4", "ImageNet 256x256, conditional model",
           {"FID no guidance": "10.94", "IS no guidance": "100.98", "precision no guidance": "0.69",
            "recall no guidance": "0.63", "FID scale 1.0": "4.59", "IS scale 1.0": "186.70",
            "precision scale 1.0": "0.82", "recall scale 1.0": "0.52"},
           "larger classifier scales trade recall for precision and IS"),
    Anchor("adm_t5", ADM, "Table 5", "ImageNet 256x256",
           {"ADM-G FID (250 steps)": "4.59", "ADM-G FID (25 DDIM steps)": "5.44",
            "BigGAN-deep FID": "6.95", "BigGAN-deep precision": "0.87", "BigGAN-deep recall": "0.28",
            "ADM FID": "10.94", "ADM recall": "0.63"}),
    Anchor("adm_arch", ADM, "Tables 1-3", "ImageNet 128x128 architecture ablations",
           {}, "the ADM architecture changes (width, attention heads and resolutions, BigGAN "
           "up/down-sampling, adaptive group norm) lower FID at equal training iterations; see the tables"),
    Anchor("cfg_t1", CFG, "Table 1", "ImageNet 64x64, guidance strength w",
           {}, "IS rises monotonically with w while FID is lowest at a small w and then rises; "
           "each guided step evaluates the network twice (conditional and unconditional)"),
    Anchor("pacgan_t1", PACGAN, "Table 1", "2-D ring (8 modes) and 2-D grid (25 modes), plain GAN",
           {"GAN ring modes": "6.3 +- 0.5 of 8", "GAN grid modes": "17.3 +- 0.8 of 25"},
           "packing the discriminator (PacGAN) recovers nearly all modes; see the same table"),
    Anchor("pacgan_stacked", PACGAN, "stacked-MNIST table (numbers first reported by VEEGAN, "
           "Srivastava et al. 2017, Table 2)", "stacked MNIST, 1000 modes",
           {"DCGAN modes": "99.0", "DCGAN KL": "3.40"},
           "a plain DCGAN covers a small fraction of the 1000 modes; PacDCGAN covers nearly all"),
)}

# Which anchors stand beside which claim.
CLAIM_ANCHORS: dict[str, tuple[str, ...]] = {
    "C1": ("pacgan_t1", "pacgan_stacked", "adm_t5"),
    "C2": ("pacgan_t1", "pacgan_stacked"),
    "C3": (),
    "C4": ("ddim_t1",),
    "C5": ("ddpm_t1", "ddpm_t2"),
    "C6": ("iddpm", "ddim_t1"),
    "C7": ("adm_arch", "adm_t4", "adm_t5"),
    "C8": ("cfg_t1",),
}


def anchor_text(claim_id: str) -> str:
    keys = CLAIM_ANCHORS.get(claim_id, ())
    if not keys:
        return "no published anchor (a property of this benchmark's runs)"
    return " | ".join(ANCHORS[k].text() for k in keys)
