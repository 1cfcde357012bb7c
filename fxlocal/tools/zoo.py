"""The zoo check: one model through convert, one train step, gradient isolation and the export
round trip, stage by stage, with the first failing stage and its reason as plain data.

``benchmarks/zoo.py`` sweeps :func:`check_model` over every timm and torchvision
classification model (one process per model) and renders ``docs/zoo.md``;
``tests/tools/test_zoo_sample.py`` runs :func:`check_model` on one model per family.

Models are built for a small input (:data:`SIZE`); a model that rejects it is built for the
sizes its source gives for it (:func:`fxlocal.models.native_input_sizes`: fixed-resolution
models timm does not flag, patch sizes that do not divide 64), smallest first. Large models are
built on the meta device and every stage runs there (shape propagation on fake tensors): shapes,
graphs, gradient flow and state-dict keys are checked, nothing is computed or allocated.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import time
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..convert import AnalyzedModel, analyze_model, convert
from ..errors import FxLocalError, InputSizeError, KOutOfRangeError, NotAClassifierError
from ..local_model import LocalModel
from ..models import create_model, native_input_sizes
from .verify import export_mismatch, isolation_violations

__all__ = [
    "AUX",
    "SIZE",
    "STAGES",
    "TIMM_FX_EXCLUDED",
    "K",
    "Unsplittable",
    "ZooFailure",
    "all_models",
    "check",
    "check_model",
    "family",
    "fx_excluded",
    "parameter_count",
    "prepare",
    "representatives",
    "stratified_sample",
]

AUX = ("dgl", "auglocal", "mlaan", "man", "infopro", "infopro+man")
# What timm's own FX tests leave out (timm tests/test_models.py, EXCLUDE_FX_FILTERS).
TIMM_FX_EXCLUDED = ("vit_gi*", "hiera*", "gemma4_vit*")
SIZE = (3, 64, 64)  # small enough to run every model on a CPU
K = 4
CLASSES = 10
# not the batch shapes are traced with (trace.SHAPE_BATCH), so that a batch size baked into a
# block or a unit copy fails the step
BATCH = 3
STAGES = ("create", "convert", "step", "isolation", "export")
LR = 0.01  # the step's SGD learning rate (momentum 0.9)


class ZooFailure(FxLocalError):
    """A model failed one stage of the zoo check."""

    def __init__(self, stage: str, exc: BaseException | str):
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {_first_line(exc)}"
        super().__init__(f"{stage}: {text}")
        self.stage, self.reason = stage, text[:300]


class Unsplittable(ZooFailure):
    """The model cannot be cut at all (K=1 only), and convert said so, naming that largest K."""


# ---------------------------------------------------------------- which models


def all_models() -> list[str]:
    """Every timm model name, then every torchvision classification model as ``torchvision:NAME``
    (not the paper models fxlocal itself registers with timm)."""
    import timm
    import torchvision

    timm_names = [n for n in timm.list_models() if not timm.models.model_entrypoint(n).__module__.startswith("fxlocal")]
    return [*timm_names, *(f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models))]


def family(name: str) -> str:
    """The module that defines the model: timm's (``resnet``), torchvision's (``torchvision:vgg``)."""
    if name.startswith("torchvision:"):
        import torchvision

        return "torchvision:" + torchvision.models.get_model_builder(name.split(":", 1)[1]).__module__.rsplit(".", 1)[-1]
    return _timm_families()[name]


@functools.cache
def _timm_families() -> dict[str, str]:
    import timm

    return {model: module for module in timm.list_modules() for model in timm.list_models(module=module)}


def fx_excluded(name: str) -> bool:
    """Whether timm's own FX tests leave this model out (outside the zoo's target)."""
    return not name.startswith("torchvision:") and any(fnmatch.fnmatch(name, p) for p in TIMM_FX_EXCLUDED)


def parameter_count(name: str) -> int:
    """Parameters of ``name`` as built for the first input size it takes, counted on the meta
    device (a model's parameters may depend on its input size: position embeddings)."""
    sizes = _input_sizes(name)
    for size in sizes[:-1]:
        try:
            return _count(_create(name, size, meta=True))
        except InputSizeError:
            continue
    return _count(_create(name, sizes[-1], meta=True))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def representatives(chosen: list[str]) -> list[str]:
    """One model per family of the installed timm and torchvision: the one in ``chosen`` (a
    cached :func:`stratified_sample`) where a family has one, else the family's smallest, so
    that a timm upgrade with new families or renamed models still gets every family."""
    names = all_models()
    picked = {family(n): n for n in set(chosen) & set(names)}
    missing = [n for n in names if family(n) not in picked]
    return sorted([*picked.values(), *stratified_sample(missing)])


def stratified_sample(names: list[str]) -> list[str]:
    """The smallest model of every family (ties: the first name); unbuildable ones count as huge."""
    best: dict[str, tuple[int, str]] = {}
    for name in names:
        try:
            size = parameter_count(name)
        except Exception:  # noqa: BLE001 - unbuildable here: the check will say why
            size = 1 << 62
        fam = family(name)
        if fam not in best or (size, name) < best[fam]:
            best[fam] = (size, name)
    return sorted(n for _, n in best.values())


# ---------------------------------------------------------------- one model


def check_model(name: str, aux_methods: list[str], fake_above: int) -> list[dict]:
    """One row per aux method: status, the failing stage and reason, details, seconds.

    Statuses: ``ok`` (real tensors: finite losses, every trainable parameter changed by the step
    or listed in ``unchanged`` with the reason it cannot, isolation, export round trip with
    identical outputs); ``ok-fake`` (the same stages on the meta device: shapes, graphs, gradient
    flow and state-dict keys, nothing computed); ``degraded`` (it passed, but at a lower K than
    asked: the reason says why); ``unsplittable`` (convert refused every K above 1 with an error
    naming it); ``no head`` (a feature encoder, refused as not a classifier); ``fail``.

    Runs on the meta device, computing nothing, when the model has more than ``fake_above``
    parameters. The model is built, traced and analysed once (the first row's seconds include
    that), then converted for each aux method."""
    warnings.filterwarnings("ignore")
    rows = []
    fake = analyzed = None
    for aux in aux_methods:
        torch.manual_seed(0)
        started = time.perf_counter()
        row = {"model": name, "family": family(name), "aux": aux, "status": "ok", "stage": "", "reason": ""}
        try:
            if fake is None:
                with _stage("create"):
                    fake = parameter_count(name) > fake_above
            if analyzed is None:
                try:
                    analyzed = prepare(name, fake)
                except ZooFailure as failure:
                    analyzed = failure  # the same for every aux method: not tried again
            if isinstance(analyzed, ZooFailure):
                raise analyzed
            row.update(check(analyzed, aux, fake=fake))
            if fake:
                row["status"] = "ok-fake"
            if "k_error" in row:  # passed, at the largest K the model allows
                row.update(status="degraded", stage="convert", reason=row.pop("k_error"))
        except ZooFailure as failure:
            row.update(status=_status(failure), stage=failure.stage, reason=failure.reason)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
    return rows


def _status(failure: ZooFailure) -> str:
    if isinstance(failure, Unsplittable):
        return "unsplittable"
    if isinstance(failure.__cause__, NotAClassifierError):
        return "no head"  # a feature encoder (timm's *_enc): refused with that reason, outside the target
    return "fail"


def prepare(name: str, fake: bool) -> AnalyzedModel:
    """``name`` built (on the meta device when ``fake``), traced and analysed at the first input
    size it takes (see the module docstring)."""
    sizes = _input_sizes(name)
    for i, size in enumerate(sizes):
        try:
            with _stage("create"):
                original = _create(name, size, meta=fake)
            with _stage("convert"):
                analyzed = analyze_model(original, size, num_classes=CLASSES, name=name)
        except ZooFailure as failure:
            if isinstance(failure.__cause__, InputSizeError) and i + 1 < len(sizes):
                continue  # the model rejects this size: the next one
            raise
        return analyzed
    raise AssertionError("unreachable: the last size raises")


def check(analyzed: AnalyzedModel, aux: str, fake: bool = False, k: int = K) -> dict:
    """Convert ``analyzed`` with ``k`` blocks (or, when it has fewer cut points, the largest K,
    after checking that ``k`` fails with an error naming it), one train step with per-block
    optimizers, gradient isolation of every block's loss, export round trip (strict load into a
    fresh original; on real tensors, bit-identical eval output). Returns details (mode, input
    size, K, cut candidates, parameters); raises :class:`ZooFailure` at the first failing stage.
    """
    local, details = _convert(analyzed, aux, k)
    details["mode"] = "fake" if fake else "real"
    size = analyzed.input_size
    # a model built on the meta device steps as it is: meta tensors carry shapes, graphs and
    # gradient flow through every stage and compute nothing (writes to them are no-ops)
    device = torch.device("meta" if fake else "cpu")
    x = torch.randn(BATCH, *size, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    if fake:
        train_one_step(local, x, y, fake)
    else:
        details["unchanged"] = _trained_step(analyzed, local, x, y)
    with _stage("isolation"):
        problems = isolation_violations(local, x, y)
        if problems:
            raise ZooFailure("isolation", "; ".join(problems))
    with _stage("export"):
        fresh = _create(analyzed.model_name, size, meta=fake)
        why = export_mismatch(local, fresh, None if fake else torch.randn(BATCH, *size))
        if why:
            raise ZooFailure("export", why)
    return details


def _convert(analyzed: AnalyzedModel, aux: str, k: int) -> tuple[LocalModel, dict]:
    details: dict = {"params_m": round(_count(analyzed.model) / 1e6, 2)}
    if analyzed.input_size != SIZE:
        details["input"] = list(analyzed.input_size)
    with _stage("convert"):
        try:
            local = convert(analyzed, k=k, aux=aux)
        except KOutOfRangeError as exc:
            # too few cut points: the error must name the largest K, and that K must work
            largest = exc.max_k
            if largest >= k or f"k can be 1 to {largest}" not in str(exc):
                raise
            details["k_error"] = str(exc)
            if largest == 1:
                raise Unsplittable("convert", exc) from exc
            local = convert(analyzed, k=largest, aux=aux)
        details.update(k=local.k, candidates=local.plan.num_candidates)
    return local, details


def train_one_step(local: LocalModel, x: torch.Tensor, y: torch.Tensor, fake: bool) -> None:
    """One SGD-momentum step of every block (the zoo check's ``step`` stage); real losses must be finite."""
    with _stage("step"):
        optimizers = [torch.optim.SGD(list(local.block_parameters(b)), lr=LR, momentum=0.9) for b in range(local.k)]
        losses = local.train_step(x, y, optimizers, as_tensors=True)
        if not fake and not all(torch.isfinite(loss) for loss in losses):
            raise ZooFailure("step", f"non-finite loss {[float(v) for v in losses]}")


def _trained_step(analyzed: AnalyzedModel, local: LocalModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """:func:`train_one_step` on real tensors, then every trainable parameter must have changed.

    Returns:
        The parameters that did not, each with the reason it cannot: no gradient, a zero one, or
        an update below float32's resolution at the parameter's value (ConvNeXt's 1e-6 layer
        scales), and for the backbone whether one end-to-end step on the same batch moves it.

    Raises:
        ZooFailure: (stage ``step``) a parameter whose update would change it was left alone, or
            a backbone parameter that the end-to-end step moves gets no gradient at all locally.
    """
    trainable = {n: p for n, p in local.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    gradient: dict[str, str] = {}  # the last gradient each parameter received, as a reason or "moves"

    def recorder(name):
        def record(param):
            grad, value = param.grad.detach(), param.detach()
            if not grad.abs().sum() > 0:
                gradient[name] = "zero gradient"
            # the step's own kernel (SGD's first step: param.add_(grad, alpha=-lr)): a product
            # and a difference rounded apart can move an element that kernel leaves (it fuses
            # the multiply-add where the CPU can)
            elif torch.equal(value.add(grad, alpha=-LR), value):
                gradient[name] = "an update below float32 resolution"
            else:
                gradient[name] = "moves"

        return record

    handles = [p.register_post_accumulate_grad_hook(recorder(n)) for n, p in trainable.items()]
    try:
        backbone_before = {k: v.detach().clone() for k, v in local.backbone_state_dict().items()}
        train_one_step(local, x, y, fake=False)
    finally:
        for handle in handles:
            handle.remove()
    with _stage("step"):
        unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
        stalled = [n for n in unchanged if gradient.get(n) == "moves"]
        if stalled:
            raise ZooFailure("step", f"{len(stalled)} parameters have a gradient but the step left them: {', '.join(stalled[:3])}")
        original_key = {t.data_ptr(): k for k, t in local.backbone_state_dict().items()}
        reasons, untrained = {}, []
        moved_end_to_end = None
        for n in unchanged:
            why = gradient.get(n, "no gradient")
            key = original_key.get(trainable[n].data_ptr())
            if key is None:  # an aux head's
                reasons[n] = f"{why} (aux head)"
                continue
            if moved_end_to_end is None:
                moved_end_to_end = _moved_end_to_end(analyzed, backbone_before, x, y)
            if key in moved_end_to_end and why == "no gradient":
                untrained.append(key)
            else:
                reasons[key] = f"{why}; end to end {'it moves' if key in moved_end_to_end else 'it stays too'}"
        if untrained:
            raise ZooFailure("step", f"{len(untrained)} parameters that end-to-end training moves get no gradient: {', '.join(untrained[:3])}")
    return reasons


def _moved_end_to_end(analyzed: AnalyzedModel, state: dict, x: torch.Tensor, y: torch.Tensor) -> set[str]:
    """The parameters one end-to-end SGD step on ``x``, ``y`` changes, from ``state``."""
    model = _create(analyzed.model_name, analyzed.input_size, meta=False)
    model.load_state_dict(state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    logits = model.train()(x)
    if isinstance(logits, (tuple, list)):  # training-mode extras (Inception's aux logits, distillation heads)
        logits = logits[0]
    torch.nn.functional.cross_entropy(logits, y).backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _input_sizes(name: str) -> list[tuple[int, ...]]:
    """SIZE first, then the sizes the model's source gives, smallest first."""
    return [SIZE, *(s for s in native_input_sizes(name) if s != SIZE and s[0] == SIZE[0])]


def _create(name: str, size: tuple[int, ...], meta: bool) -> nn.Module:
    """``name`` built for ``size``; on the meta device when ``meta``. A constructor that computes
    with tensors (torchvision's RegNet derives its widths with ``torch`` ops, then reads them)
    cannot run there: it is built on the CPU and moved to the meta device."""
    if not meta:
        return create_model(name, CLASSES, size)
    try:
        with torch.device("meta"):
            return create_model(name, CLASSES, size)
    except Exception as exc:
        # only a constructor that needs tensor data is worth building for real; any other
        # failure (an input size it rejects) would only be repeated, at full cost
        if "meta" not in str(exc):
            raise
    return create_model(name, CLASSES, size).to("meta")


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    """Any exception inside becomes a :class:`ZooFailure` of this stage."""
    try:
        yield
    except ZooFailure:
        raise
    except Exception as exc:  # the zoo records every failure, whatever it is
        raise ZooFailure(name, exc) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
