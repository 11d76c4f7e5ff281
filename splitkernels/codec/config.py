"""Codec settings as frozen data: they serialise to JSON and travel inside plans."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..ops import CODEC_BITS

THRESHOLD_MODES = ("rms", "abs")
BIT_MODES = ("error", "budget", "passthrough")
DEFAULT_BIT_CHOICES = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class CodecConfig:
    """TS + TAB-Q settings (docs/FORMATS.md, docs/DESIGN.md §1).

    * ``threshold``: ``"rms"`` (tau_t = alpha * rms(x_t)) or ``"abs"`` (tau_t = ``tau``).
    * ``capacity``: at most this many outliers per token (largest magnitude first).
    * ``mode``: ``"error"`` picks per token the smallest width in ``bit_choices`` whose
      estimated error is within ``eps`` of the inlier norm; ``"budget"`` spends an average of
      ``avg_bits`` frame bits per element (all metadata counted) where they cut the most
      error; ``"passthrough"`` sends every value raw and exactly (lossless).
    Tokens whose range does not fit fp16, or that no width satisfies, travel raw.
    """

    # Defaults are the quality-first point measured on SmolLM2-135M / Botchan at splits 4/10/15/22
    # (bench/results/e2e/report.md): KL <= 0.0045 and <= +0.6% perplexity at 5.4-5.5 bits per
    # element, every frame byte counted. eps around 0.22 reaches 4.5 bits at KL ~0.015.
    threshold: str = "rms"
    alpha: float = 3.0
    tau: float | None = None
    capacity: int = 16
    bit_choices: tuple[int, ...] = field(default=DEFAULT_BIT_CHOICES)
    mode: str = "error"
    eps: float = 0.12
    avg_bits: float | None = None

    def __post_init__(self) -> None:
        if self.threshold not in THRESHOLD_MODES:
            raise ValueError(f"threshold must be one of {THRESHOLD_MODES}, got {self.threshold!r}")
        if self.mode not in BIT_MODES:
            raise ValueError(f"mode must be one of {BIT_MODES}, got {self.mode!r}")
        object.__setattr__(self, "bit_choices", tuple(sorted(set(int(b) for b in self.bit_choices))))
        bad = [b for b in self.bit_choices if b not in CODEC_BITS]
        if bad:
            raise ValueError(f"bit_choices entries must be in {CODEC_BITS}, got {bad}")
        if self.mode != "passthrough" and not self.bit_choices:
            raise ValueError("bit_choices must not be empty")
        if self.threshold == "abs" and (self.tau is None or not self.tau >= 0):
            raise ValueError(f"tau must be a non-negative number with threshold='abs', got {self.tau!r}")
        if self.threshold == "rms" and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 0:
            raise ValueError(f"capacity must be a non-negative int, got {self.capacity!r}")
        if self.mode == "error" and not self.eps > 0:
            raise ValueError(f"eps must be > 0 in mode 'error', got {self.eps!r}")
        if self.mode == "budget" and (self.avg_bits is None or not self.avg_bits > 0):
            raise ValueError(f"avg_bits must be > 0 in mode 'budget', got {self.avg_bits!r}")

    @classmethod
    def passthrough(cls) -> "CodecConfig":
        """Lossless: every token raw in the input dtype, no outlier split."""
        return cls(mode="passthrough", capacity=0)

    @property
    def threshold_value(self) -> float:
        return float(self.tau if self.threshold == "abs" else self.alpha)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bit_choices"] = list(self.bit_choices)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
        return cls(**{**d, "bit_choices": tuple(d.get("bit_choices", DEFAULT_BIT_CHOICES))})
