"""Built-in models by name, and the model a user names: a built-in, a class in their own file, or a state dict.

``fedleak check --model`` (and any caller) reads a model spec with :func:`load_model`. The spec's forms are
model *sources*, tried in the order they are registered (:data:`MODEL_SOURCES`):

* ``path/to/file.py:ClassName`` -- the user's own ``nn.Module`` class. **This runs the user's Python file**
  (as ``python file.py`` would, without ``__main__``, under the seed) and builds the class with no arguments; the
  name may also be a function called with none that returns the model, or a module the file built;
* ``model.safetensors`` / ``model.pt`` -- the state dict of a Sequential MLP, as :func:`fedleak.load_mlp` reads it;
* a built-in name (:data:`BUILTIN_MODELS`): ``flower-cnn`` (Flower's quickstart ``Net``), ``mlp`` and the
  certifiable CNNs ``convnet`` / ``convnet-digits`` built by fedleak's own builders, each seeded.

Weights for a class or a built-in come from a state-dict file read without unpickling anything
(:func:`fedleak.tensor_files.read_tensor_file`: safetensors, a torch file of tensors read with ``weights_only``, or
a numpy ``.npz``; by name, or a list in ``state_dict()`` order as Flower's NDArrays).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.logits_of import per_sample_logits
from fedleak.models.catalog import BUILTIN_MODELS, MODEL_CATALOG
from fedleak.registry import Registry

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: how to build it (seeded), the shape of one input and a built-in data set it fits."""

    name: str
    description: str
    build: Callable[[int], nn.Module]
    input_shape: tuple[int, ...]
    data: str


@dataclass(frozen=True)
class LoadedModel:
    """A model read from a spec: the module (in eval mode), a name for reports, what it was read from, and,
    for a built-in, its input shape and the built-in data set it fits (None otherwise)."""

    module: nn.Module
    name: str
    source: str
    input_shape: tuple[int, ...] | None = None
    data: str | None = None




def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global generator as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _flower(seed: int) -> nn.Module:
    from fedleak.models.flower import FlowerNet

    return _seeded(FlowerNet, seed)


def _mlp(seed: int) -> nn.Module:
    from fedleak.models.mlp import make_mlp

    return make_mlp((1, 8, 8), [1024], 10, seed=seed)


def _convnet(seed: int) -> nn.Module:
    from fedleak.models.convnet import make_convnet

    return make_convnet((1, 28, 28), 10, channels=(6, 32), padding=1, fc_widths=(1024,), seed=seed)


def _convnet_digits(seed: int) -> nn.Module:
    from fedleak.models.convnet import make_convnet

    return make_convnet((1, 8, 8), 10, channels=(6, 32), padding=1, fc_widths=(1024,), seed=seed)


_BUILDERS = {"flower-cnn": (_flower, (3, 32, 32), "retina"), "mlp": (_mlp, (1, 8, 8), "digits"),
             "convnet": (_convnet, (1, 28, 28), "fashion-mnist"),
             "convnet-digits": (_convnet_digits, (1, 8, 8), "digits")}
for _entry in MODEL_CATALOG:  # descriptions come from the catalog, which lists them without torch
    _build, _shape, _data = _BUILDERS[_entry.name]
    BUILTIN_MODELS.register(_entry.name, BuiltinModel(_entry.name, _entry.about, _build, _shape, _data))


# ----------------------------------------------------------------------------------------------------------
# Model sources


@dataclass(frozen=True)
class ModelSource:
    """One form of model spec: ``matches(spec)`` says whether the spec has this form, ``load(spec, weights, seed)``
    reads it."""

    name: str
    description: str
    matches: Callable[[str], bool]
    load: Callable[[str, Path | None, int], LoadedModel]


MODEL_SOURCES: Registry[ModelSource] = Registry("model source")


def _is_class_spec(spec: str) -> bool:
    path, sep, cls = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(cls)


def _run_user_file(path: Path) -> object:
    """Execute the user's Python file as a fresh module (its folder on ``sys.path`` meanwhile, as for a script)."""
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"fedleak_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot read {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code may raise anything
        sys.modules.pop(name, None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"running {path} raised {type(exc).__name__}" + (f": {first}" if first else "")) from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _load_class(spec: str, weights: Path | None, seed: int) -> LoadedModel:
    file, _, name = spec.rpartition(":")
    path = Path(file)
    module = _seeded(lambda: _run_user_file(path), seed)  # a module-level instance is seeded too
    model, kind = _user_model(path, module, name, seed)
    if weights is not None:
        load_weights(model, weights)
    return LoadedModel(model.eval(), name, f"{kind} of {path}" + _with(weights))


def _user_model(path: Path, module: object, name: str, seed: int) -> tuple[nn.Module, str]:
    """What ``name`` in the user's file gives: an ``nn.Module`` class built with no arguments, a function called with
    none that returns a module (a factory, ``get_model()``), or a module built when the file ran; and its kind."""
    obj = getattr(module, name, None)
    if isinstance(obj, nn.Module):
        return obj, f"module {name}"
    is_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if not is_class and not inspect.isfunction(obj):
        found = sorted(n for n, v in vars(module).items() if _offers_model(v, module))
        raise ModelError(f"{path} defines no nn.Module class, model function or module '{name}'"
                         + (f"; it defines {', '.join(found)}" if found else ""))
    required = [p.name for p in inspect.signature(obj).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ModelError(f"{name}() cannot be built without arguments (it needs {', '.join(required)}); give its "
                         f"arguments defaults, or write a {'subclass' if is_class else 'function'} that passes them")
    try:
        model = _seeded(obj, seed)
    except Exception as exc:  # the user's constructor may raise anything
        raise ModelError(f"{name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name}() returned {type(model).__name__}, not an nn.Module")
    return model, f"{'class' if is_class else 'function'} {name}"


def _offers_model(value: object, module: object) -> bool:
    """Whether a name of the user's file can be given as its model: a class or function the file defines, or a
    module it built."""
    if isinstance(value, nn.Module):
        return True
    own = getattr(value, "__module__", None) == getattr(module, "__name__", None)
    return own and (inspect.isfunction(value) or (isinstance(value, type) and issubclass(value, nn.Module)))


def _with(weights: Path | None) -> str:
    return "" if weights is None else f", weights {weights}"


def _load_state_dict(spec: str, weights: Path | None, seed: int) -> LoadedModel:
    from fedleak.models.io import load_mlp

    if weights is not None:
        raise ModelError(f"{spec} already holds the model's weights; weights apply to a class or a built-in model")
    model = load_mlp(spec)
    return LoadedModel(model.eval(), Path(spec).name, f"Sequential MLP state dict {spec}", tuple(model.input_shape))


def _load_builtin(spec: str, weights: Path | None, seed: int) -> LoadedModel:
    entry = BUILTIN_MODELS.get(spec, error=ModelError)
    model = entry.build(seed)
    if weights is not None:
        load_weights(model, weights)
    how = f"built-in {entry.name}: {entry.description}" + (f", seed {seed}" if weights is None else _with(weights))
    return LoadedModel(model.eval(), entry.name, how, entry.input_shape, entry.data)


MODEL_SOURCES.register("class", ModelSource(
    "class", "path/to/file.py:ClassName (runs that Python file)", _is_class_spec, _load_class))
MODEL_SOURCES.register("state-dict", ModelSource(
    "state-dict", "a .safetensors or .pt state dict of a Sequential MLP",
    lambda spec: spec.endswith(STATE_DICT_SUFFIXES), _load_state_dict))
MODEL_SOURCES.register("built-in", ModelSource(
    "built-in", "a built-in model name", lambda spec: spec in BUILTIN_MODELS, _load_builtin))


def load_model(spec: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None,
               seed: int = 0) -> LoadedModel:
    """The model ``spec`` names (see the module docstring), in eval mode.

    ``weights``: a state dict for a class or a built-in model (safetensors, or a torch file of tensors read with
    ``weights_only=True``; nothing else is unpickled). ``seed`` seeds the initialisation when no weights are
    given. Raises :class:`ModelError` naming the problem.
    """
    text = os.fspath(spec)
    for _, source in MODEL_SOURCES.items():
        if source.matches(text):
            return source.load(text, None if weights is None else Path(weights), seed)
    raise ModelError(f"unknown model '{text}'; give a built-in name ({', '.join(BUILTIN_MODELS.names())}), "
                     "path/to/file.py:ClassName, or a .safetensors/.pt state dict of a Sequential MLP")


def load_model_for(spec: str | os.PathLike[str], input_shape: tuple[int, ...], num_classes: int, *,
                   weights: str | os.PathLike[str] | None = None, seed: int = 0, binary: bool = False) -> nn.Module:
    """:func:`load_model`'s module, checked to run on inputs of ``input_shape`` and to give at least
    ``num_classes`` outputs per sample (the data's classes) or, where ``binary``, one for two classes (a binary
    classifier's logit), for what trains it on a data set; else :class:`ModelError` saying which."""
    model = load_model(spec, weights=weights, seed=seed).module
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:  # noqa: BLE001 - any error of the user's forward is reported as one line
        raise ModelError(f"model {spec} does not run on the data's inputs {tuple(input_shape)}: "
                         f"{type(exc).__name__}: {exc}{_layout_hint(model, tuple(input_shape))}") from None
    shape = tuple(per_sample_logits(out, 2).shape)
    if len(shape) != 2 or not (shape[1] >= num_classes or (binary and shape[1] == 1 and num_classes == 2)):
        gives = f"{shape[1]} outputs per sample" if len(shape) == 2 else f"outputs of shape {shape} for 2 samples"
        raise ModelError(f"model {spec} gives {gives}, but the data has {num_classes} classes: it needs an output "
                         "per class")
    return model


def _layout_hint(model: nn.Module, data_shape: tuple[int, ...]) -> str:
    """What to do when the model takes as many values per sample as the data holds, laid out otherwise (a data set
    holds images, C x H x W: a file of N x C x L signals is read as N x 1 x C x L)."""
    from fedleak.nets import input_shape_of

    try:
        own = input_shape_of(model)[0]
    except ModelError:
        return ""
    if own == data_shape or math.prod(own) != math.prod(data_shape):
        return ""
    view = ", ".join(["x.size(0)", *(str(s) for s in own)])
    return (f". The model takes inputs of shape {own}, the same {math.prod(own)} values per sample laid out otherwise "
            f"(fedleak's data sets hold C x H x W images; N x C x L signals are read as N x 1 x C x L): begin its "
            f"forward with x = x.view({view})")


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a state-dict file into ``model`` (every key and shape must match, but for one prefix common to all
    of them: a wrapper's, :mod:`fedleak.state_names`), or a list of tensors in ``model.state_dict()`` order
    (Flower's NDArrays saved with ``numpy.savez``); returns the model."""
    from fedleak.state_names import renamed
    from fedleak.tensor_files import LISTED, read_tensor_file
    from fedleak.validation import check_finite_tensors

    state, meta = read_tensor_file(path, "weights", ModelError, lists=True)
    if LISTED in meta:  # Flower's NDArrays: the state dict's values, in order
        own = model.state_dict()
        if len(state) != len(own):
            raise ModelError(f"weights {path} hold a list of {len(state)} arrays, but {type(model).__name__}'s state "
                             f"dict has {len(own)} entries: save them in model.state_dict() order, or by name")
        state = dict(zip(own, state.values()))
    check_finite_tensors(state.items(), f"{path}: parameter")
    own = model.state_dict()
    state, _ = renamed(state, own)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {extra[:5]}"] if extra else [])
        raise ModelError(f"weights {path} do not fit {type(model).__name__}: " + "; ".join(parts))
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelError(f"weights {path}: '{key}' has shape {tuple(value.shape)} but the model's has "
                             f"{tuple(own[key].shape)}")
    model.load_state_dict(state)
    return model
