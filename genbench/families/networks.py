"""Noise-prediction networks from outside genbench, for the diffusion family's `network:` card param.

    params:
      network: {type: diffusers, config: {block_out_channels: [32, 64], ...}}   # a fresh UNet2DModel
      network: {type: diffusers, path: some/save_pretrained/folder}            # a saved one, its weights loaded

Either way the UNet is wrapped to what `Diffusion.net` is called with, net(x, t[, labels]) -> eps
([B, C, H, W], or eps and v stacked on channels with learn_sigma), and is trained by genbench's one
training loop and sampled by its samplers; its weights live in the run's model.pt like any other network.

diffusers is an optional extra (`pip install 'genbench[diffusers]'`), imported only when a card names
it. Every problem is a NetworkError (a UserError and a ValueError, so the runner's plan names the card
and the CLI prints one line): diffusers missing, an unknown type or key, a folder that is missing or
does not hold a UNet2DModel, or a UNet that cannot give what the card asks (learn_sigma needs 2C output
channels, class_cond a class embedding with room for every label). A folder is checked from its
config.json; on the meta device (the runner's plan) the UNet is built from that config without
reading the weights.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from genbench.errors import UserError

NETWORK_TYPES = ("diffusers",)
EXTRA = "genbench[diffusers]"
UNET_CLASS = "UNet2DModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Time embeddings that take genbench's integer timesteps 0..T-1: "fourier" expects continuous noise
# levels (score-SDE) and divides the output by t, infinite at t = 0.
TIME_EMBEDDINGS = ("positional", "learned")


class NetworkError(UserError, ValueError):
    """A card's `network:` that cannot be built: one line, exit 2, before any training."""


def _diffusers():
    try:
        import diffusers
        from diffusers import UNet2DModel
    except ImportError as e:
        raise NetworkError(f"network type 'diffusers' needs the optional extra: pip install '{EXTRA}' "
                           f"(diffusers does not import: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
                           ) from None
    return diffusers, UNet2DModel


def _on_meta() -> bool:
    """Whether modules are being built on the meta device (the runner's plan builds cards that way)."""
    return torch.get_default_device().type == "meta"


def build_network(network, *, in_channels: int, out_channels: int, image_size: int, num_labels: int,
                  fill_labels: int, timesteps: int) -> nn.Module:
    """The module a card's `network:` names, checked against what the diffusion model needs.

    out_channels: C, or 2C with learn_sigma. num_labels: the class embedding's least size (0: the
    model is unconditional and the UNet must have no class embedding); fill_labels: the size given to
    a `config:` that does not set num_class_embeds."""
    if not isinstance(network, dict):
        raise NetworkError(f"network must be a mapping with a 'type' (one of {', '.join(NETWORK_TYPES)}), "
                           f"got {network!r}")
    kind = network.get("type")
    if kind not in NETWORK_TYPES:
        raise NetworkError(f"network: unknown type {kind!r}; known: {', '.join(NETWORK_TYPES)} "
                           "(leave `network` out for genbench's own UNet)")
    unknown = sorted(set(map(str, network)) - {"type", "config", "path"})
    if unknown:
        raise NetworkError(f"network: unknown key {unknown[0]!r} (type diffusers takes config or path)")
    if ("config" in network) == ("path" in network):
        raise NetworkError("network: type diffusers needs exactly one of config (a UNet2DModel configuration) "
                           "or path (a save_pretrained folder)")
    need = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                num_labels=num_labels, timesteps=timesteps)
    if "config" in network:
        return DiffusersUNet.from_card_config(network["config"], fill_labels=fill_labels, **need)
    return DiffusersUNet.from_folder(network["path"], **need)


def _read_folder_config(path) -> tuple[Path, dict]:
    if not isinstance(path, str) or not path.strip():
        raise NetworkError(f"network: path must be a folder name, got {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NetworkError(f"network: path {str(folder)!r} is not a folder (a UNet2DModel's save_pretrained folder)")
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise NetworkError(f"network: {folder} has no config.json: not a diffusers save_pretrained folder") from None
    except (OSError, ValueError) as e:
        raise NetworkError(f"network: {cfg_file} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise NetworkError(f"network: {cfg_file} is not a JSON object")
    cls = cfg.get("_class_name")
    if cls != UNET_CLASS:
        raise NetworkError(f"network: {folder} holds a model of class {cls or '(none named)'}, not a {UNET_CLASS}")
    if not any(p.is_file() for p in folder.iterdir()
               if p.name.startswith("diffusion_pytorch_model") and p.suffix in (".safetensors", ".bin", ".json")):
        raise NetworkError(f"network: {folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    return folder, cfg


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as genbench's denoiser: forward(x, t, y=None) -> the UNet's output.

    t: the original timesteps 0..T-1 ([B], long in training, float when a respaced sampler calls),
    passed to the UNet's time embedding as they are; y: class labels (the null class included) for
    the UNet's class embedding."""

    def __init__(self, unet: nn.Module, where: str):
        super().__init__()
        self.unet = unet
        self.where = where            # for messages: "network.config" or the folder

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=y, return_dict=False)[0]

    # ------------------------------------------------------------------ building

    @classmethod
    def from_card_config(cls, config, *, in_channels: int, out_channels: int, image_size: int, num_labels: int,
                         fill_labels: int, timesteps: int) -> "DiffusersUNet":
        """A fresh UNet2DModel from the card's config; in_channels, out_channels and sample_size default to
        the data's, num_class_embeds to the label count when the model is class-conditional."""
        _, UNet2DModel = _diffusers()
        if not isinstance(config, dict):
            raise NetworkError(f"network.config must be a mapping of UNet2DModel arguments, got {config!r}")
        accepted = [p for p in inspect.signature(UNet2DModel.__init__).parameters if p != "self"]
        unknown = sorted(set(map(str, config)) - set(accepted))
        if unknown:
            raise NetworkError(f"network.config: unknown UNet2DModel argument {unknown[0]!r} "
                               f"(diffusers {_version()} takes {', '.join(accepted)})")
        cfg = {"in_channels": in_channels, "out_channels": out_channels, "sample_size": image_size, **config}
        if num_labels and cfg.get("num_class_embeds") is None and cfg.get("class_embed_type") is None:
            cfg["num_class_embeds"] = fill_labels
        where = "network.config"
        _check_config(cfg, where, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                      num_labels=num_labels, timesteps=timesteps)
        try:
            unet = UNet2DModel(**cfg)
        except Exception as e:  # noqa: BLE001 - diffusers' own refusal of the arguments, in one line
            raise NetworkError(f"{where}: UNet2DModel does not build ({type(e).__name__}: {_first_line(e)})") from None
        return cls(unet, where)

    @classmethod
    def from_folder(cls, path, *, in_channels: int, out_channels: int, image_size: int, num_labels: int,
                    timesteps: int) -> "DiffusersUNet":
        """A saved UNet2DModel with its weights (on the meta device: its config only, no weights read)."""
        _, UNet2DModel = _diffusers()
        folder, raw = _read_folder_config(path)
        where = f"network.path {str(folder)!r}"
        try:
            cfg = dict(UNet2DModel.load_config(str(folder)))
        except Exception as e:  # noqa: BLE001
            raise NetworkError(f"{where}: its config does not load ({type(e).__name__}: {_first_line(e)})") from None
        _check_config({**_defaults(UNet2DModel), **{k: v for k, v in cfg.items() if not k.startswith("_")}}, where,
                      in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                      num_labels=num_labels, timesteps=timesteps)
        try:
            if _on_meta():   # the plan: the architecture, not the weights
                unet = UNet2DModel.from_config(cfg)
            else:
                unet = UNet2DModel.from_pretrained(str(folder), torch_dtype=torch.float32, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - a folder whose weights do not load: one line
            raise NetworkError(f"{where}: UNet2DModel does not load ({type(e).__name__}: {_first_line(e)})") from None
        return cls(unet, where)


def _defaults(fn_cls) -> dict:
    return {k: p.default for k, p in inspect.signature(fn_cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # noqa: BLE001
        return "?"


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _check_config(cfg: dict, where: str, *, in_channels: int, out_channels: int, image_size: int, num_labels: int,
                  timesteps: int) -> None:
    """What genbench's diffusion needs of a UNet2DModel configuration, each refusal one line."""
    if cfg.get("in_channels") != in_channels:
        raise NetworkError(f"{where}: in_channels is {cfg.get('in_channels')}, the data has {in_channels} channels")
    if cfg.get("out_channels") != out_channels:
        why = (f"learn_sigma needs {out_channels} (eps and v per channel)" if out_channels != in_channels
               else f"the model predicts eps with {out_channels} channels (with learn_sigma: true it would need "
                    f"{2 * in_channels})")
        raise NetworkError(f"{where}: out_channels is {cfg.get('out_channels')}; {why}")
    size = cfg.get("sample_size")
    if size is not None:
        sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if sizes != (image_size, image_size):
            raise NetworkError(f"{where}: sample_size is {size}, the data is {image_size}x{image_size}")
    blocks = cfg.get("down_block_types") or ()
    halvings = max(len(blocks) - 1, 0)
    if image_size % (2 ** halvings):
        raise NetworkError(f"{where}: {len(blocks)} down blocks halve the image {halvings} times; "
                           f"{image_size}x{image_size} does not divide by {2 ** halvings}")
    emb = cfg.get("time_embedding_type", "positional")
    if emb not in TIME_EMBEDDINGS:
        raise NetworkError(f"{where}: time_embedding_type {emb!r} does not take integer timesteps 0..T-1; "
                           f"use one of {', '.join(TIME_EMBEDDINGS)}")
    if emb == "learned" and (cfg.get("num_train_timesteps") or 0) < timesteps:
        raise NetworkError(f"{where}: a learned time embedding needs num_train_timesteps >= timesteps "
                           f"({timesteps}), got {cfg.get('num_train_timesteps')}")
    kind, n_emb = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    has_classes = kind is not None or n_emb is not None
    if num_labels == 0:
        if has_classes:
            raise NetworkError(f"{where}: the UNet has a class embedding (class_embed_type {kind!r}, "
                               f"num_class_embeds {n_emb}) but the card is not class_cond")
        return
    if kind == "timestep":
        return   # labels go through the sinusoidal embedding: any integer label fits
    if kind is not None:
        raise NetworkError(f"{where}: class_cond needs class_embed_type null (an embedding table) or 'timestep', "
                           f"got {kind!r}")
    if n_emb is None or n_emb < num_labels:
        raise NetworkError(f"{where}: class_cond needs a class embedding with at least {num_labels} entries "
                           f"(the dataset's classes, and the null class when p_uncond > 0); num_class_embeds is {n_emb}")
