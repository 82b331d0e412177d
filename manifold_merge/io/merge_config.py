"""mergekit-style YAML merge configurations -> a validated :class:`MergePlan`.

The ``models:`` form of mergekit's ``MergeConfiguration`` is accepted::

    merge_method: ties                 # mergekit's name (nuslerp is mapped onto slerp)
    base_model: runs/base              # the pretrained model (task vectors theta_i - base)
    models:
      - model: runs/base               # the base may be listed too; it is then not a model
      - model: runs/sst2
        parameters: {weight: 0.6}      # per-model weight (a number or filter rules)
      - model: runs/mnli
        parameters: {weight: 0.4}
    parameters:                        # the method's parameters, mergekit's names
      density: 0.5
      lambda: [{filter: mlp, value: 0.8}, {value: 1.0}]
    dtype: float32                     # mergekit's compute dtype; see below
    out_dtype: bfloat16                # dtype of the written tensors (default: dtype, else
                                       # the first model's)
    tokenizer_source: base             # base (default), union (see below) or a model path
    manifold_merge:                    # our extras, merged into the method's parameters
      granularity: row
      tol: 1.0e-9

Top-level keys: ``merge_method`` (required), ``models`` (required), ``base_model``,
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``, ``chat_template`` (ignored with
a warning: the tokenizer files are copied unchanged) and ``manifold_merge`` (our extras: any
parameter of the method, e.g. ``granularity``, ``tol``, ``max_iter``, ``manifold``, ``approx``,
``metric``, ``groups``, ``seed``; a key may not be in both ``parameters`` and
``manifold_merge``). Per model: ``model`` (a local path: a Hugging Face folder, a
``.safetensors`` file, an Orbax checkpoint or a PEFT adapter folder; relative paths are taken
from the working directory, as mergekit does), ``parameters`` and ``manifold_merge`` (paths of
per-model statistics for the methods that take them: ``fishers`` for ``fisher``,
``fisher_rao_karcher`` and ``frechet``, ``grams`` for ``regmean``; a safetensors file or folder
whose tensors are named like the model's).

Semantics, following mergekit where it has the method:

* A parameter is a scalar, or mergekit's filter rules ``[{filter: mlp, value: 0.5},
  {value: 0.3}]`` (first matching substring wins, ``re:`` for a regular expression, a rule
  without a filter, or with filter ``"*"``, is the default; a single rule may be given without
  the list). Rules without a default get the method's default appended, as mergekit falls back
  to it. Precedence: per-model, then global, then the method's default.
* ``weight``: per model (a number or filter rules, resolved per tensor), or a global default;
  when no model gives a weight all weights are 1. Either every model gives one or none does.
* Any other per-model parameter (e.g. ``density``) is accepted only when every model ends up
  with the same value, which then becomes the global value: :func:`manifold_merge.merge` takes
  one value per parameter for all models, so differing per-model values are refused.
* ``dtype``: mergekit's compute dtype. We compute in float32 or better whatever it says
  (float32 for float16/bfloat16/float32 inputs), so it only sets the output dtype when
  ``out_dtype`` is absent, as in mergekit.
* The base model: for methods that use one, a ``models:`` entry equal to ``base_model`` is the
  base, not a model (its parameters are ignored, as in mergekit). ``linear`` (and the
  statistic-based ``fisher`` / ``regmean``) merge every listed model; ``base_model`` then only
  names where the tokenizer and config files come from. ``karcher`` with a base merges task
  vectors (Paper A), where mergekit's karcher ignores the base (a warning says so).
* mergekit defaults that differ from ours are applied for mergekit's method names when the
  config does not set them: ``density: 1.0`` for ties / dare_ties / dare_linear (no trimming;
  our Python API requires it) and ``normalize: false`` for ``dare_ties``.
* mergekit parameters mapped: ``filter_wise: true`` (model_stock) -> ``granularity: row``;
  nuslerp's ``nuslerp_flatten: false`` -> ``granularity: row`` (``column`` with
  ``nuslerp_row_wise: true``: the vectors along axis 0). Ignored with a warning:
  ``int8_mask`` (the dtype of the sign mask only), multislerp's ``eps``, ``rescale: false``
  and ``density`` for task_arithmetic (no effect in mergekit either).
* Refused with a message saying why: the ``slices:`` and ``modules:`` forms (layer ranges and
  modules), gradients (lists of numbers interpolated across layers), ``tokenizer:`` (vocabulary
  surgery), LoRA-applied model references (``model: {lora: ...}``), ``epsilon`` / ``gamma``
  (della and breadcrumbs, not implemented), ``rescale: true`` for ties, nuslerp with a base
  model (SLERP of task vectors; our slerp with a base interpolates from the base), unknown
  keys, methods and parameters (with the closest valid name), and settings that cannot run
  (no models, a base-needing method without ``base_model``, weights that sum to zero, too
  many or too few models).
* ``tokenizer_source: union`` is not implemented: the tokenizer files are copied from the base
  model (or the first model) with a warning; this equals mergekit's union only when the models
  share one tokenizer (the embeddings' shapes are checked to agree when merging).

Every error is a :class:`ConfigError` (a ``ValueError``) whose message starts with the config
key path, e.g. ``models[1].parameters.wieght: unknown parameter; did you mean 'weight'?``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import yaml

from manifold_merge.merging.registry import REQUIRED, MethodSpec, get_method, list_methods
from manifold_merge.merging.tree import COMMON_DEFAULTS, LORA_DEFAULTS, resolve_param

#: Key of our extensions, at the top level (method parameters) and per model (statistics).
EXTRAS_KEY = "manifold_merge"
TOP_LEVEL_KEYS = (
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    EXTRAS_KEY,
    # recognised in order to refuse them with a clear message
    "slices",
    "modules",
    "tokenizer",
)
MODEL_KEYS = ("model", "parameters", EXTRAS_KEY)
#: mergekit method name -> our registered method.
ALIASES = {"nuslerp": "slerp"}
#: mergekit methods without a counterpart here (refused with that reason, not as typos).
MERGEKIT_ONLY = (
    "passthrough",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "arcee_fusion",
    "nearswap",
    "task_adapter",
    "ram",
    "lrp",
    "pcb",
    "cabs",
    "tokenizer_permute",
)
#: mergekit's defaults where they differ from our registry's, applied to mergekit's names.
MERGEKIT_DEFAULTS = {
    "ties": {"density": 1.0},
    "dare_ties": {"density": 1.0, "normalize": False},
    "dare_linear": {"density": 1.0},
}
#: Parameters whose value is itself a list (not a mergekit gradient).
LIST_PARAMS = ("scaling",)
#: dtype spellings -> canonical names.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
}
# mergekit parameter names we map or ignore (so they are not reported as typos).
_COMPAT_PARAMS = {
    "int8_mask",
    "rescale",
    "epsilon",
    "gamma",
    "eps",
    "filter_wise",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "density",
}


class ConfigError(ValueError):
    """An invalid merge configuration; the message starts with the offending key path."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One input model of a merge.

    Attributes:
        path: the model's path as written in the config.
        weight: its ``weight``: a number, mergekit filter rules (resolved per tensor), or None
            (no weight given: 1).
        params: its other per-model ``parameters`` as written (already folded into
            :attr:`MergePlan.parameters`, see the module docstring).
        stats: statistic name (``"fishers"``, ``"grams"``) -> path of a checkpoint of that
            statistic, from the model's ``manifold_merge:`` key.
        where: the entry's key path in the config, e.g. ``"models[1]"``.
    """

    path: str
    weight: Any = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stats: Mapping[str, str] = dataclasses.field(default_factory=dict)
    where: str = ""


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A validated merge: what :func:`manifold_merge.merge` is called with, tensor by tensor.

    Attributes:
        method: the registered method (mergekit's ``nuslerp`` becomes ``slerp``).
        models: the models to merge (the base excluded for methods that use one).
        base_model: the base model's path, or None.
        parameters: the method's parameters (global ``parameters``, per-model values that agree,
            our ``manifold_merge:`` extras and mergekit's defaults), each a scalar or filter
            rules; without ``weight``.
        dtype: mergekit's compute dtype (canonical name) or None; computation is float32 or
            better whatever it says.
        out_dtype: the output dtype (canonical name) or None.
        tokenizer_source: ``"base"``, ``"union"``, a model path, or None.
        mergekit_method: the method's name as written.
        notes: the warnings issued while parsing.

    Example:
        >>> plan = load_merge_config({
        ...     "merge_method": "task_arithmetic",
        ...     "base_model": "base",
        ...     "models": [{"model": "base"},
        ...                {"model": "a", "parameters": {"weight": 0.7}},
        ...                {"model": "b", "parameters": {"weight": 0.3}}],
        ...     "parameters": {"lambda": 0.5},
        ...     "out_dtype": "bf16"})
        >>> plan.method, [m.path for m in plan.models], plan.weights(), plan.output_dtype
        ('task_arithmetic', ['a', 'b'], [0.7, 0.3], 'bfloat16')
        >>> plan.parameters
        {'lambda': 0.5}
    """

    method: str
    models: tuple[ModelSpec, ...]
    base_model: str | None
    parameters: Mapping[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    mergekit_method: str = ""
    notes: tuple[str, ...] = ()

    @property
    def output_dtype(self) -> str | None:
        """``out_dtype``, else ``dtype`` (as mergekit), else None (each tensor keeps the first
        model's dtype)."""
        return self.out_dtype or self.dtype

    @property
    def spec(self) -> MethodSpec:
        """The registered :class:`~manifold_merge.merging.MethodSpec` of :attr:`method`."""
        return get_method(self.method)

    @property
    def uses_base(self) -> bool:
        """True when the base model enters the merge (not only its tokenizer files)."""
        return self.base_model is not None and self.spec.uses_base

    def weights(self) -> list[float] | None:
        """The per-model weights when they are all numbers (None: no weights given).

        Raises:
            ConfigError: some weight is given by filter rules (use :meth:`weights_for`).
        """
        if all(m.weight is None for m in self.models):
            return None
        if any(not _is_number(m.weight) for m in self.models):
            raise ConfigError(
                "models[].parameters.weight: given by filter rules, so it depends on the "
                "tensor; use weights_for(tensor name)"
            )
        return [float(m.weight) for m in self.models]

    def weights_for(self, tensor: str, models: list[int] | None = None) -> list[float] | None:
        """The per-model weights for ``tensor`` (filter rules resolved), or None.

        Args:
            tensor: the tensor's name.
            models: indices into :attr:`models` (default all), e.g. the models holding a tensor.

        Returns:
            One weight per selected model, or None when no model gives a weight.
        """
        idx = range(len(self.models)) if models is None else models
        if all(self.models[i].weight is None for i in idx):
            return None
        out = []
        for i in idx:
            m = self.models[i]
            value = resolve_param(m.weight, tensor, f"{m.where}.parameters.weight")
            out.append(1.0 if value is None else float(value))
        return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _closest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _known_params(spec: MethodSpec) -> dict[str, Any]:
    return {**COMMON_DEFAULTS, **(LORA_DEFAULTS if spec.lora else {}), **spec.defaults}


def _model_ref(value: Any, where: str) -> str:
    """mergekit's ModelReference: a path string, or ``{path: ...}`` / ``{model: {path: ...}}``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError(f"{where}: empty model path")
        return value
    if isinstance(value, Mapping):
        if value.get("lora") is not None:
            raise ConfigError(
                f"{where}: a LoRA-applied model reference (lora: ...) is not supported; merge "
                "the LoRA into the model first, or merge PEFT adapter folders directly"
            )
        inner = value.get("model", value)
        if isinstance(inner, Mapping) and isinstance(inner.get("path"), str):
            return _model_ref(inner["path"], where)
        if isinstance(inner, str):
            return _model_ref(inner, where)
    raise ConfigError(f"{where}: expected a model path (a string), got {value!r}")


def _normalize_value(value: Any, where: str, param: str) -> Any:
    """A parameter's value: a scalar, or a validated list of filter rules."""
    if param == "groups":
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{where}: groups must be a mapping {{name: filters}}")
        return None if value is None else dict(value)
    if isinstance(value, Mapping):  # a single ConditionalParameter
        value = [value]
    if isinstance(value, (list, tuple)):
        if param in LIST_PARAMS and all(_is_number(v) for v in value):
            return list(value)
        if value and all(isinstance(v, Mapping) for v in value):
            return [_normalize_rule(r, f"{where}[{k}]", param) for k, r in enumerate(value)]
        if value and all(isinstance(v, (int, float, str, bool)) for v in value):
            raise ConfigError(
                f"{where}: {value!r} is a mergekit gradient (values interpolated across "
                "layers), which manifold_merge does not support yet; give one value, or "
                "filter rules [{filter: ..., value: ...}, {value: ...}]"
            )
        raise ConfigError(
            f"{where}: expected a value or a list of filter rules "
            f"[{{filter: ..., value: ...}}, {{value: ...}}], got {value!r}"
        )
    if value is not None and not isinstance(value, (int, float, str, bool)):
        raise ConfigError(f"{where}: expected a number, string or boolean, got {value!r}")
    return value


def _normalize_rule(rule: Mapping, where: str, param: str) -> dict:
    for key in rule:
        if key not in ("filter", "value"):
            raise ConfigError(
                f"{where}.{key}: unknown key in a filter rule{_closest(key, ['filter', 'value'])}"
            )
    if "value" not in rule:
        raise ConfigError(f"{where}: a filter rule needs a 'value'")
    flt = rule.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ConfigError(f"{where}.filter: expected a string, got {flt!r}")
    value = rule["value"]
    if isinstance(value, (list, tuple, Mapping)) and param not in LIST_PARAMS:
        raise ConfigError(
            f"{where}.value: {value!r} is a mergekit gradient or nested rule, which "
            "manifold_merge does not support yet; give one value per rule"
        )
    out = {"value": value}
    if flt is not None and flt != "*":
        out = {"filter": flt, "value": value}
    return out


def _with_default(value: Any, default: Any) -> Any:
    """Filter rules without a default rule get ``default`` appended (mergekit falls back to
    the next level, ultimately the method's default)."""
    if (
        isinstance(value, list)
        and value
        and isinstance(value[0], dict)
        and all("filter" in r for r in value)
        and default is not REQUIRED
    ):
        return [*value, {"value": default}]
    return value


def _read(source: Any) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), "config"
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"config: expected a YAML file path or a mapping, got {type(source).__name__}"
        )
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r}: is a folder, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path!r}: cannot be read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r}: not valid YAML ({e})") from None
    if not isinstance(data, Mapping):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"config file {path!r}: the YAML is {got}, expected a mapping with merge_method "
            "and models"
        )
    return dict(data), f"config file {path!r}"


def _note(notes: list, msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def _resolve_method(name: Any) -> tuple[str, MethodSpec]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"merge_method: expected a method name, got {name!r}")
    if name in MERGEKIT_ONLY:
        raise ConfigError(
            f"merge_method: mergekit's {name!r} is not implemented in manifold_merge; "
            f"available: {sorted(list_methods() + list(ALIASES))}"
        )
    method = ALIASES.get(name, name)
    try:
        return method, get_method(method)
    except KeyError:
        options = list_methods() + list(ALIASES)
        raise ConfigError(
            f"merge_method: unknown method {name!r}{_closest(name, options)} "
            f"(available: {sorted(options)})"
        ) from None


def _check_param_names(params: Mapping, where: str, allowed: dict, spec: MethodSpec) -> None:
    for key in params:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: parameter names must be strings, got {key!r}")
        if key in allowed or key in _COMPAT_PARAMS:
            continue
        raise ConfigError(
            f"{where}.{key}: unknown parameter of method {spec.name!r}"
            f"{_closest(key, list(allowed))} (it takes: {sorted(allowed)})"
        )


def _apply_compat(
    params: dict, mergekit_method: str, spec: MethodSpec, has_base: bool, notes: list
) -> None:
    """Map or drop mergekit parameters our method does not take (see the module docstring)."""
    known = _known_params(spec)

    def pop(name):
        return params.pop(name) if name in params else None

    if "int8_mask" in params and "int8_mask" not in known:
        pop("int8_mask")
        _note(notes, "parameters.int8_mask is ignored (it only sets the dtype of mergekit's mask)")
    for name in ("epsilon", "gamma"):
        if name in params and name not in known:
            raise ConfigError(
                f"parameters.{name}: a parameter of mergekit's della / breadcrumbs "
                f"sparsification, which manifold_merge does not implement (method "
                f"{spec.name!r} has no {name!r})"
            )
    if "eps" in params and "eps" not in known:
        pop("eps")
        _note(notes, f"parameters.eps is ignored ({spec.name!r} has its own stable formulas)")
    if "rescale" in params and "rescale" not in known:
        value = pop("rescale")
        if value not in (False, None) and spec.name != "task_arithmetic":
            raise ConfigError(
                f"parameters.rescale: rescale={value!r} is not supported by {spec.name!r} "
                "(it never rescales the trimmed task vectors); remove it or set it to false"
            )
        if value not in (False, None):
            _note(notes, "parameters.rescale is ignored (no sparsification in task_arithmetic)")
    if "density" in params and "density" not in known:
        if spec.name == "task_arithmetic":
            pop("density")
            _note(notes, "parameters.density is ignored (task_arithmetic does not sparsify)")
        else:
            raise ConfigError(
                f"parameters.density: unknown parameter of method {spec.name!r} "
                f"(it takes: {sorted(known)})"
            )
    if "filter_wise" in params:
        value = pop("filter_wise")
        if spec.name != "model_stock" and "filter_wise" not in known:
            raise ConfigError(
                f"parameters.filter_wise: a model_stock parameter, not {spec.name!r}'s"
            )
        if value:
            _set_granularity(params, "row", "filter_wise: true")
    flatten, row_wise = pop("nuslerp_flatten"), pop("nuslerp_row_wise")
    if (flatten is not None or row_wise is not None) and mergekit_method != "nuslerp":
        raise ConfigError(
            "parameters.nuslerp_flatten / nuslerp_row_wise: nuslerp parameters, not "
            f"{mergekit_method!r}'s"
        )
    if mergekit_method == "nuslerp":
        if has_base:
            raise ConfigError(
                "base_model: nuslerp with a base model (SLERP of the task vectors) is not "
                "available; slerp with a base interpolates from the base to the model. Remove "
                "base_model, or use merge_method: slerp"
            )
        if flatten is False:
            _set_granularity(params, "column" if row_wise else "row", "nuslerp_flatten: false")


def _set_granularity(params: dict, value: str, why: str) -> None:
    if params.get("granularity", value) != value:
        raise ConfigError(
            f"parameters: {why} means granularity {value!r}, but granularity "
            f"{params['granularity']!r} is also given"
        )
    params["granularity"] = value


def _canonical_dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = str(value).lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ConfigError(
            f"{where}: unsupported dtype {value!r}{_closest(name, DTYPE_NAMES)} "
            f"(supported: {sorted(set(DTYPE_NAMES.values()))})"
        )
    return DTYPE_NAMES[name]


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def load_merge_config(source: str | os.PathLike | Mapping) -> MergePlan:
    """Parse and validate a mergekit-style merge configuration.

    Only ``yaml.safe_load`` is used (no Python objects from YAML tags). Paths are not checked
    here (see ``manifold-merge merge --dry-run``).

    Args:
        source: a YAML file path, or the already-loaded mapping.

    Returns:
        The :class:`MergePlan`. Warnings (ignored mergekit parameters, ...) are issued as
        ``UserWarning`` and kept in :attr:`MergePlan.notes`.

    Raises:
        ConfigError: the configuration is invalid; the message starts with the key path.

    Example:
        >>> plan = load_merge_config({
        ...     "merge_method": "karcher",
        ...     "models": [{"model": "a"}, {"model": "b"}],
        ...     "manifold_merge": {"granularity": "row", "tol": 1e-9}})
        >>> plan.method, plan.parameters, plan.weights()
        ('karcher', {'granularity': 'row', 'tol': 1e-09}, None)
        >>> try:
        ...     load_merge_config({"merge_method": "ties", "models": [{"model": "a"}]})
        ... except ConfigError as e:
        ...     print(e)  # doctest: +ELLIPSIS
        base_model: method 'ties' needs a base model (it merges task vectors ...
    """
    data, what = _read(source)
    notes: list[str] = []
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{key}: unknown config key{_closest(key, TOP_LEVEL_KEYS)} (in {what}; known: "
                f"{', '.join(TOP_LEVEL_KEYS[:9])})"
            )
    for key in ("slices", "modules"):
        if data.get(key) is not None:
            raise ConfigError(
                f"{key}: the {key}: form of mergekit configs (layer ranges, per-module merges) "
                "is not supported; list whole models under models: instead"
            )
    if data.get("tokenizer") is not None:
        raise ConfigError(
            "tokenizer: tokenizer configuration (vocabulary merging) is not supported; the "
            "tokenizer files are copied from tokenizer_source, the base model or the first model"
        )
    if "merge_method" not in data:
        raise ConfigError(f"merge_method: missing (in {what})")
    mergekit_method = data["merge_method"]
    method, spec = _resolve_method(mergekit_method)
    known = _known_params(spec)
    if data.get("chat_template") is not None:
        _note(notes, "chat_template is ignored: the tokenizer files are copied unchanged")

    base = data.get("base_model")
    base = None if base is None else _model_ref(base, "base_model")

    # -- global parameters and our extras ---------------------------------------------------
    raw_global = data.get("parameters") or {}
    if not isinstance(raw_global, Mapping):
        raise ConfigError(f"parameters: expected a mapping of parameter: value, got {raw_global!r}")
    allowed = {**known, "weight": None}
    _check_param_names(raw_global, "parameters", allowed, spec)
    params = {k: _normalize_value(v, f"parameters.{k}", k) for k, v in raw_global.items()}
    extras = data.get(EXTRAS_KEY) or {}
    if not isinstance(extras, Mapping):
        raise ConfigError(f"{EXTRAS_KEY}: expected a mapping of parameter: value, got {extras!r}")
    for key, value in extras.items():
        if key not in known:
            raise ConfigError(
                f"{EXTRAS_KEY}.{key}: unknown parameter of method {method!r}"
                f"{_closest(key, known)} (it takes: {sorted(known)})"
            )
        if key in params:
            raise ConfigError(
                f"{EXTRAS_KEY}.{key}: also given in parameters.{key}; give it in one place"
            )
        params[key] = _normalize_value(value, f"{EXTRAS_KEY}.{key}", key)
    global_weight = params.pop("weight", None)
    if global_weight is not None:
        _check_weight_value(global_weight, "parameters.weight")

    # -- models ----------------------------------------------------------------------------
    entries = data.get("models")
    if entries is None:
        raise ConfigError(f"models: missing (in {what}); list the models to merge")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"models: expected a non-empty list of {{model: PATH}}, got {entries!r}")
    models: list[ModelSpec] = []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{where}: expected a mapping {{model: PATH, parameters: ...}}, got {entry!r}"
            )
        for key in entry:
            if key not in MODEL_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key{_closest(key, MODEL_KEYS)}")
        if "model" not in entry:
            raise ConfigError(f"{where}.model: missing")
        path = _model_ref(entry["model"], f"{where}.model")
        mp = entry.get("parameters") or {}
        if not isinstance(mp, Mapping):
            raise ConfigError(f"{where}.parameters: expected a mapping, got {mp!r}")
        is_base = base is not None and spec.uses_base and _same_path(path, base)
        if not is_base:
            _check_param_names(mp, f"{where}.parameters", allowed, spec)
        mp = {k: _normalize_value(v, f"{where}.parameters.{k}", k) for k, v in mp.items()}
        stats = _model_stats(entry.get(EXTRAS_KEY), f"{where}.{EXTRAS_KEY}", spec)
        if is_base:
            if mp:
                _note(notes, f"{where} is the base model; its parameters {sorted(mp)} are ignored")
            continue
        weight = mp.pop("weight", None)
        if weight is not None:
            _check_weight_value(weight, f"{where}.parameters.weight")
            if _is_number(global_weight):  # rules without a default fall back to the global
                weight = _with_default(weight, global_weight)
        elif global_weight is not None:
            weight = global_weight
        models.append(ModelSpec(path, weight, mp, stats, where))
    if not models:
        raise ConfigError("models: no model to merge besides the base model")
    if base is None and spec.requires_base:
        raise ConfigError(
            f"base_model: method {method!r} needs a base model (it merges task vectors "
            "theta_i - base); add base_model: PATH"
        )

    # -- weights ---------------------------------------------------------------------------
    given = [m for m in models if m.weight is not None]
    if given and len(given) != len(models):
        missing = [m.where for m in models if m.weight is None]
        raise ConfigError(
            f"{missing[0]}.parameters.weight: missing, while {[m.where for m in given]} give "
            "one; give every model a weight (or none, for equal weights)"
        )
    if given:
        for m in models:
            if _is_number(m.weight) and m.weight < 0 and not spec.negative_weights:
                raise ConfigError(
                    f"{m.where}.parameters.weight: {m.weight} is negative; method {method!r} "
                    "needs non-negative weights"
                )
        if all(_is_number(m.weight) for m in models):
            total = math.fsum(float(m.weight) for m in models)
            if total == 0:
                raise ConfigError(
                    f"models[].parameters.weight: the weights {[m.weight for m in models]} sum "
                    "to zero"
                )

    # -- per-model parameters other than weight: one value for all models, or refused ------
    for key in sorted({k for m in models for k in m.params}):
        default = MERGEKIT_DEFAULTS.get(mergekit_method, {}).get(key, known.get(key, REQUIRED))
        values = [m.params.get(key, params.get(key, default)) for m in models]
        if any(v != values[0] for v in values[1:]):
            listing = ", ".join(
                f"{m.where} ({m.path!r}): {'unset' if v is REQUIRED else v!r}"
                for m, v in zip(models, values)
            )
            first = next(m.where for m in models if key in m.params)
            raise ConfigError(
                f"{first}.parameters.{key}: per-model values of {key!r} are not supported yet "
                f"(manifold_merge.merge takes one {key} for all models); the models give "
                f"{listing}. Set one value in parameters.{key}"
            )
        params[key] = values[0]

    # -- mergekit compatibility, defaults, required parameters -----------------------------
    _apply_compat(params, mergekit_method, spec, base is not None, notes)
    for key, value in MERGEKIT_DEFAULTS.get(mergekit_method, {}).items():
        params.setdefault(key, value)
    for key in list(params):
        params[key] = _with_default(params[key], known.get(key, REQUIRED))
    for key, default in spec.defaults.items():
        if default is REQUIRED and key not in params:
            raise ConfigError(f"parameters.{key}: method {method!r} needs this parameter")
    _check_model_count(spec, len(models), base is not None and spec.uses_base, params, models)
    if method == "karcher" and base is not None:
        _note(
            notes,
            "karcher with base_model merges the task vectors theta_i - base (Paper A) and adds "
            "the base back; mergekit's karcher ignores base_model",
        )
    for sname in spec.required_stats:
        lacking = [m.where for m in models if sname not in m.stats]
        if lacking:
            raise ConfigError(
                f"{lacking[0]}.{EXTRAS_KEY}.{sname}: method {method!r} needs per-model "
                f"{sname} (a safetensors file or folder of tensors named like the model's)"
            )
    for sname in spec.stats:
        having = [m.where for m in models if sname in m.stats]
        if having and len(having) != len(models):
            lacking = [m.where for m in models if sname not in m.stats]
            raise ConfigError(
                f"{lacking[0]}.{EXTRAS_KEY}.{sname}: missing, while {having} give {sname}; "
                "give it for every model or for none"
            )

    # -- dtypes, tokenizer -----------------------------------------------------------------
    dtype = _canonical_dtype(data.get("dtype"), "dtype")
    out_dtype = _canonical_dtype(data.get("out_dtype"), "out_dtype")
    tok = data.get("tokenizer_source")
    if tok is not None:
        tok = _model_ref(tok, "tokenizer_source")
        if tok == "union":
            src = base or models[0].path
            _note(
                notes,
                f"tokenizer_source: union is not implemented; the tokenizer files are copied "
                f"from {src!r} (the same as a union only when the models share one tokenizer)",
            )
        elif tok == "base" and base is None:
            raise ConfigError("tokenizer_source: 'base' needs a base_model")
    return MergePlan(
        method=method,
        models=tuple(models),
        base_model=base,
        parameters=params,
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tok,
        mergekit_method=mergekit_method,
        notes=tuple(notes),
    )


def _check_weight_value(value: Any, where: str) -> None:
    if _is_number(value):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: the weight must be finite, got {value!r}")
        return
    if isinstance(value, list) and all(isinstance(r, dict) for r in value):
        for k, r in enumerate(value):
            if not _is_number(r["value"]) or not math.isfinite(r["value"]):
                raise ConfigError(
                    f"{where}[{k}].value: expected a finite number, got {r['value']!r}"
                )
        return
    raise ConfigError(f"{where}: expected a number or filter rules, got {value!r}")


def _model_stats(value: Any, where: str, spec: MethodSpec) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of statistic: PATH, got {value!r}")
    out = {}
    for key, path in value.items():
        if key not in spec.stats:
            options = list(spec.stats)
            takes = f"it takes {options}" if options else "it takes no per-model statistics"
            raise ConfigError(
                f"{where}.{key}: unknown per-model key for method {spec.name!r}"
                f"{_closest(key, options)} ({takes})"
            )
        out[key] = _model_ref(path, f"{where}.{key}")
    return out


def _check_model_count(spec, n: int, has_base: bool, params: dict, models) -> None:
    if spec.name == "slerp":
        want = 1 if has_base else 2
        if n != want:
            with_base = (
                "with a base model, 1 other model" if has_base else "2 models (or a base and 1)"
            )
            raise ConfigError(f"models: slerp takes {with_base}, got {n} models to merge")
        if params.get("t") is not None and any(m.weight is not None for m in models):
            raise ConfigError("parameters.t: slerp takes either t or per-model weights, not both")
        return
    lo, hi = spec.num_models
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'any'}"
        base_note = " besides the base" if has_base else ""
        raise ConfigError(f"models: method {spec.name!r} takes {want} models{base_note}, got {n}")
