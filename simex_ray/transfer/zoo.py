"""Any pretrained classifier a user owns, as the classifier library runs it (Ray-free).

An *architecture string* names how a weight file becomes a network, a small registry:

    lenet5                  the LeNet-5 of :mod:`.classifiers` (what `simex train-bases` trains)
    torchvision:<name>      ``torchvision.models.get_model(name, weights=None, num_classes=N)``: nothing is downloaded
    timm:<name>             ``timm.create_model(name, pretrained=False, num_classes=N)`` (``pip install timm``)
    torchscript             a TorchScript archive (``torch.jit.load``): the network is in the file

Weights: a state_dict in ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)``: no arbitrary object is
ever unpickled) or ``.safetensors``; the TorchScript archive itself for ``torchscript``.

What the library reads from a classifier (:class:`ZooModel`), in one forward pass per batch:

- **logits**: the network's output (N, K); probabilities are their softmax;
- **features**: by default the penultimate layer, i.e. the input of the final classification ``nn.Linear``
  (timm's ``get_classifier()``, else the last ``nn.Linear`` the network registers: torchvision's ``fc``,
  ``classifier[-1]``, ``heads.head``), read by a forward pre-hook; or, with ``layer``, the output of the named
  module, flattened, global-average-pooled over (H, W) first when it is (N, C, H, W). A TorchScript module takes
  no hooks: its features are read from a second copy of the archive whose final ``Linear`` is the identity
  (weight I_D, bias 0), and its logits are that Linear applied to them, which :func:`check_model` verifies
  equals the archive's output when the classifier is added.

Preprocessing: images arrive (N, C, H, W) float in [0, 1] in the classifier's image format; with a
``mean``/``std`` per channel the network sees ``(x - mean) / std``.
Cost: one forward pass per batch, O(N) memory in the features (N, D); batches of ``batch_size`` images.
"""

from __future__ import annotations

import difflib
import io
import threading
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..choices import CLASSIFIER_ARCHITECTURES
from ..errors import UserError, clip, one_line
from ..formats import LEGACY, ImageFormat

LENET = "lenet5"
TORCHSCRIPT = "torchscript"
FAMILIES = CLASSIFIER_ARCHITECTURES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_FORMAT = "3x224x224"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
TIMM_MISSING = "timm is not installed; pip install timm (or pip install 'simex-ray[zoo]')"


class ZooError(UserError):
    """A classifier that cannot be added or built as asked; the message names the fix."""


def parse_architecture(arch: str) -> tuple[str, str]:
    """``arch`` -> (family, model name): ("lenet5", ""), ("torchvision", "resnet18"), ("timm", ...),
    ("torchscript", ""); an unknown family or model name is a one-line :class:`ZooError`."""
    arch = arch.strip()
    if arch in (LENET, TORCHSCRIPT):
        return arch, ""
    family, _, name = arch.partition(":")
    if family == "torchvision" and name:
        import torchvision

        known = torchvision.models.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5)
            raise ZooError(f"torchvision has no model '{name}'"
                           + (f"; did you mean {', '.join(close)}" if close else "")
                           + "; see torchvision.models.list_models()")
        return family, name
    if family == "timm" and name:
        timm = import_timm()
        if not timm.list_models(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5)
            raise ZooError(f"timm has no model '{name}'" + (f"; did you mean {', '.join(close)}" if close else "")
                           + "; see timm.list_models()")
        return family, name
    raise ZooError(f"unknown architecture '{arch}'; known: {', '.join(FAMILIES)}")


def import_timm():
    try:
        import timm
    except ImportError:
        raise ZooError(TIMM_MISSING) from None
    return timm


def default_format(arch: str) -> str:
    """The image format a classifier of ``arch`` takes unless told: LeNet-5's 1x28x28, else ImageNet's 3x224x224."""
    return str(LEGACY) if arch == LENET else IMAGENET_FORMAT


def default_normalization(arch: str) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) unless told: ImageNet's for torchvision and timm networks, none for LeNet-5 and TorchScript
    (an archive may normalise inside)."""
    if parse_architecture(arch)[0] in ("torchvision", "timm"):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return None, None


def check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None, fmt: ImageFormat) -> None:
    if (mean is None) != (std is None):
        raise ZooError("give both --mean and --std, or neither")
    if mean is None:
        return
    if len(mean) != fmt.channels or len(std) != fmt.channels:
        raise ZooError(f"--mean and --std need {fmt.channels} value(s) each, one per channel of {fmt}; "
                       f"got {len(mean)} and {len(std)}")
    if not all(np.isfinite(mean)) or not all(s > 0 and np.isfinite(s) for s in std):
        raise ZooError(f"--std values must be positive and every value finite; got mean {list(mean)}, std {list(std)}")


def weight_suffix(name: str, arch: str) -> str:
    """The suffix of a weight file (``.pt``, ``.pth``, ``.safetensors``), checked; a TorchScript archive is any."""
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if arch == TORCHSCRIPT:
        return suffix if suffix in WEIGHT_SUFFIXES[:2] else ".pt"
    if suffix not in WEIGHT_SUFFIXES:
        raise ZooError(f"weight file '{name}' is not a state_dict (.pt, .pth) or a .safetensors file; "
                       f"save one with torch.save(model.state_dict(), 'w.pt') or safetensors.torch.save_file")
    return suffix


def read_state(blob: bytes, suffix: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: safetensors, or ``torch.load(weights_only=True)`` of a state_dict (or of a
    checkpoint dict holding one under ``state_dict`` or ``model``; a DDP ``module.`` prefix is dropped)."""
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(blob)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file
        raise ZooError(f"the weight file cannot be read as {suffix} ({type(e).__name__}: {one_line(e, 160)}); "
                       f"save a state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not torch.is_tensor(state.get(key)):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ZooError("the weight file holds no state_dict of tensors; save one with "
                       "torch.save(model.state_dict(), 'w.pt')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_torchscript(blob: bytes) -> nn.Module:
    with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated on every load: not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(blob), map_location="cpu")


def head_linear(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the final classification Linear: timm's ``get_classifier()`` when it is a Linear,
    else the last ``nn.Linear`` (a TorchScript ``Linear``) the network registers."""
    named = list(model.named_modules())
    getter = getattr(model, "get_classifier", None)
    if callable(getter) and not isinstance(model, torch.jit.ScriptModule):
        head = getter()
        for name, m in named:
            if m is head and isinstance(m, nn.Linear):
                return name, m
    linears = [(n, m) for n, m in named
               if isinstance(m, nn.Linear) or getattr(m, "original_name", None) == "Linear"]
    if not linears:
        raise ZooError("the network has no nn.Linear classification head; pass --layer to name the module "
                       "whose output are its features")
    return linears[-1]


def build_network(arch: str, n_classes: int, image_format: ImageFormat | str, blob: bytes, suffix: str) -> nn.Module:
    """The network of ``arch`` with the weights of ``blob``, in eval mode on the CPU. A head of another number
    of classes than ``n_classes``, or weights that do not fit ``arch``, are one-line :class:`ZooError` s."""
    family, name = parse_architecture(arch)
    if family == TORCHSCRIPT:
        try:
            model = load_torchscript(blob)
        except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file
            raise ZooError(f"the file is not a TorchScript archive ({type(e).__name__}: {one_line(e, 160)}); save "
                           f"one with torch.jit.save(torch.jit.script(model), 'm.pt')") from None
        head_name, head = head_linear(model)
        found = int(head.weight.shape[0])
        if found != n_classes:
            raise ZooError(f"--num-classes {n_classes} but the archive's classification head ({head_name}) has "
                           f"{found} outputs; pass --num-classes {found}")
        return model.eval()
    state = read_state(blob, suffix)
    if family == LENET:
        from .classifiers import LeNet5

        model = LeNet5(n_classes, image_format)
    elif family == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=n_classes)
    else:
        model = import_timm().create_model(name, pretrained=False, num_classes=n_classes)
    try:
        head_name, _ = head_linear(model)
    except ZooError:  # no Linear head (e.g. a convolutional one): the probe images check its output's size
        head_name = None
    key = f"{head_name}.weight" if head_name else "weight"
    if head_name is not None and key in state and state[key].ndim == 2 and state[key].shape[0] != n_classes:
        raise ZooError(f"--num-classes {n_classes} but the weights' classification head ({key}) has "
                       f"{state[key].shape[0]} outputs; pass --num-classes {state[key].shape[0]}")
    missing, unexpected = sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        said = [f"{len(missing)} missing (e.g. '{missing[0]}')"] if missing else []
        said += [f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')"] if unexpected else []
        raise ZooError(f"the weights do not fit {arch}: {' and '.join(said)} keys; check --arch")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a size mismatch: torch names each on a line of its own
        said = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), one_line(e))
        raise ZooError(f"the weights do not fit {arch} with {n_classes} classes ({clip(said.rstrip('.'), 240)}); "
                       f"check --arch and --num-classes") from None
    return model.eval()


class ZooModel:
    """A classifier as the library runs it: ``(x - mean) / std``, then one forward pass giving its features
    and logits (see the module docstring for which features). ``network`` is the raw network."""

    def __init__(self, network: nn.Module, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, layer: str | None = None, blob: bytes | None = None,
                 device: torch.device | str = "cpu"):
        self.network, self.layer = network.eval(), layer
        self.device = torch.device(device)
        self.scripted = isinstance(network, torch.jit.ScriptModule)
        try:
            self.head_name, self.head = head_linear(network)
        except ZooError:
            if not layer or self.scripted:
                raise
            self.head_name, self.head = None, None  # features from --layer; no Linear head needed
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.features_net = None
        self.lock = threading.Lock()
        if self.scripted:
            if layer:
                raise ZooError("--layer needs the network's modules, which a TorchScript archive hides; add it "
                               "without --layer (its features: the input of its final Linear)")
            if blob is None:
                raise ZooError("a TorchScript classifier needs its archive's bytes")
            self.features_net = load_torchscript(blob).eval()
            head = dict(self.features_net.named_modules())[self.head_name]
            d = int(head.weight.shape[1])
            head.weight = nn.Parameter(torch.eye(d), requires_grad=False)  # Linear(f) = f: its input comes out
            head.bias = nn.Parameter(torch.zeros(d), requires_grad=False)
        elif layer:
            modules = dict(network.named_modules())
            if layer not in modules or not layer:
                close = difflib.get_close_matches(layer, list(modules), n=5)
                raise ZooError(f"the network has no module '{layer}'"
                               + (f"; did you mean {', '.join(close)}" if close else "")
                               + " (names as in model.named_modules())")
        self.to(self.device)

    def to(self, device) -> "ZooModel":
        self.device = torch.device(device)
        for net in (self.network, self.features_net):
            if net is not None:
                net.to(self.device)
        self.mean = None if self.mean is None else self.mean.to(self.device)
        self.std = None if self.std is None else self.std.to(self.device)
        if self.scripted:
            self.head = dict(self.network.named_modules())[self.head_name]
        return self

    @property
    def n_classes(self) -> int:
        """The head's classes (0 when the network has no Linear head: only an empty batch asks)."""
        return int(self.head.weight.shape[0]) if self.head is not None else 0

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x if self.mean is None else (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x, *, batch_size: int = 512, features: bool = True) -> tuple[np.ndarray | None, torch.Tensor]:
        """(features (N, D) float64 or None, logits (N, K) float32 on the CPU) of images x (N, C, H, W) in [0, 1]."""
        from ..training import as_tensor

        x = as_tensor(x)
        feats, logits = [], []
        for b in torch.split(x, batch_size) if len(x) else []:
            f, z = self.batch(self.preprocess(b), features)
            logits.append(z.float().cpu())
            if f is not None:
                feats.append(f.double().cpu())
        if not logits:
            d = 0 if self.layer else int(self.head.weight.shape[1])
            return (np.zeros((0, d)) if features else None), torch.zeros((0, self.n_classes))
        return (torch.cat(feats).numpy() if features else None), torch.cat(logits)

    def batch(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.scripted:
            if not features:
                return None, self.network(x)
            f = self.features_net(x).flatten(1)
            return f, F.linear(f, self.head.weight, self.head.bias)
        if not features:
            return None, self.network(x)
        with self.lock:  # a hook sees every forward through its module: one hooked pass at a time
            return self.hooked(x)

    def hooked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        if self.layer:
            hook = dict(self.network.named_modules())[self.layer].register_forward_hook(
                lambda m, args, out: seen.append(out[0] if isinstance(out, (tuple, list)) else out))
        else:
            hook = self.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            z = self.network(x)
        finally:
            hook.remove()
        f = seen[-1]
        if self.layer and f.ndim == 4:  # (N, C, H, W) -> (N, C): global average pooling
            f = f.mean(dim=(2, 3))
        return f.flatten(1), z


def check_model(model: ZooModel, fmt: ImageFormat, n_classes: int) -> int:
    """Run two probe images of format ``fmt`` through ``model``: its logits must be (2, ``n_classes``), and for a
    TorchScript archive they must equal its final Linear applied to the features read. Returns the feature
    dimension; a network that cannot take ``fmt`` or answers otherwise is a one-line :class:`ZooError`."""
    x = torch.rand((2, fmt.channels, fmt.height, fmt.width), generator=torch.Generator().manual_seed(0))
    try:
        feats, logits = model.forward(x)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - the network refused the format
        raise ZooError(f"the network cannot take {fmt} images ({type(e).__name__}: {one_line(e, 160)}); "
                       f"pass the --image-format it was trained on") from None
    if logits.ndim != 2 or logits.shape[1] != n_classes:
        raise ZooError(f"the network answers {tuple(logits.shape)} for 2 images, not (2, {n_classes}); check "
                       f"--num-classes, or export a network whose output is its logits")
    if model.scripted:
        with torch.no_grad():
            direct = model.network(model.preprocess(x)).float().cpu()
        if not torch.allclose(direct, logits, rtol=1e-4, atol=1e-5):
            raise ZooError("the archive's output is not its final Linear's output (something follows it); "
                           "export the network up to its logits")
    return int(feats.shape[1])

