"""A calibration set: real images paired with real prompts, and a digest that identifies it.

Quantization ranges come from what the graphs see in use, so the set must be the user's own
images and questions; too few samples give ranges set by a handful of outliers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from zspa.errors import InvalidInputError
from zspa.integrity import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SAMPLES = 8


@dataclass(frozen=True)
class CalibrationSample:
    image: Path
    prompt: str


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[CalibrationSample]
    digest: str  # sha256 over the images' bytes and the prompts, in sample order

    @classmethod
    def load(cls, images: Path, prompts: Path, *, min_samples: int = MIN_SAMPLES,
             max_samples: int | None = None) -> CalibrationSet:
        """Images of `images` (sorted by name) paired in turn with the prompts of `prompts`
        (one per line, `#` comments skipped; or JSON lines with a "prompt" or "question")."""
        image_files = _image_files(images)
        questions = read_prompts(prompts)
        count = len(image_files) if max_samples is None else min(len(image_files), max_samples)
        if count < min_samples:
            raise InvalidInputError(
                f"{images}: {len(image_files)} image(s); calibration needs at least {min_samples} for stable "
                "ranges (add images, or lower --min-samples)"
            )
        samples = [CalibrationSample(image_files[i], questions[i % len(questions)]) for i in range(count)]
        digest = hashlib.sha256()
        for sample in samples:
            digest.update(sha256_file(sample.image).encode())
            digest.update(sample.prompt.encode("utf-8"))
        return cls(samples, digest.hexdigest())


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: not a directory of calibration images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read prompts ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                line = record.get("prompt") or record.get("question")
            except (json.JSONDecodeError, AttributeError):
                line = None
            if not isinstance(line, str) or not line.strip():
                raise InvalidInputError(f"{path}:{number}: expected a JSON object with a \"prompt\" or \"question\"")
        prompts.append(line)
    if not prompts:
        raise InvalidInputError(f"{path}: no prompts")
    return prompts
