"""The :class:`ImportanceScores` container and its on-disk form (``scores.safetensors`` + ``scores.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SCORES_FILE = "scores.safetensors"
SUMMARY_FILE = "scores.json"


@dataclass
class ImportanceScores:
    """Activation importance of every prunable unit of a decoder (higher = more important).

    heads: [layers, num_attention_heads] — per *query* head; head h reads KV head h // (heads / kv_heads).
    neurons: [layers, intermediate_size] — MLP neurons (``down_proj`` inputs).
    channels: [hidden_size] — embedding channels (both RMSNorm outputs of every layer, summed).
    layer_block_influence: [layers] — mean over tokens of 1 - cos(layer input, layer output).
    layer_loss_increase: [layers] or None — calibration loss with the layer skipped minus base_loss.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    channels: torch.Tensor
    layer_block_influence: torch.Tensor
    layer_loss_increase: torch.Tensor | None = None
    base_loss: float = float("nan")
    num_key_value_heads: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.heads.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "heads": self.heads,
            "neurons": self.neurons,
            "channels": self.channels,
            "layer_block_influence": self.layer_block_influence,
        }
        if self.layer_loss_increase is not None:
            out["layer_loss_increase"] = self.layer_loss_increase
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def save_tensors(self, out_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(out_dir) / SCORES_FILE
        save_file(self.tensors(), str(path), metadata={"format": "pt"})
        return path


def load_scores(scores_dir: str | os.PathLike) -> ImportanceScores:
    """Read a directory written by :func:`compactlm.importance.score_model`."""
    from safetensors.torch import load_file

    scores_dir = Path(scores_dir)
    path = scores_dir / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {scores_dir} the output of the score stage?")
    t = load_file(str(path))
    summary = json.loads((scores_dir / SUMMARY_FILE).read_text()) if (scores_dir / SUMMARY_FILE).is_file() else {}
    return ImportanceScores(
        heads=t["heads"],
        neurons=t["neurons"],
        channels=t["channels"],
        layer_block_influence=t["layer_block_influence"],
        layer_loss_increase=t.get("layer_loss_increase"),
        base_loss=float(summary.get("base_loss", float("nan"))),
        num_key_value_heads=int(summary.get("model", {}).get("num_key_value_heads", 0)),
        settings=summary.get("settings", {}),
    )
