"""Run an ONNX graph in onnxruntime with every FFN's input and activation as outputs.

The graph is loaded without its external data, the FFN values named by the IR's blocks
are appended to ``graph.output``, and the session is created from the modified bytes
with onnxruntime reading external weights from the graph's own directory, so nothing is
copied or written next to the user's model.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .ir import FFNBlock


def _session_options(graph: Path, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent))
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    # idle onnxruntime threads must not spin: the statistics kernel needs the cores between runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _decode_error(graph: Path, exc: Exception) -> InputError:
    return InputError(graph, f"onnxruntime cannot run the graph: {str(exc).splitlines()[0][:300]}")


class FFNTap:
    """An InferenceSession over ``graph`` that also returns, per block, the FFN input
    [batch, seq, d] and activation [batch, seq, n_ff] (float32)."""

    def __init__(self, graph: str | Path, blocks: list[FFNBlock], threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.graph = Path(graph)
        missing = [b.layer for b in blocks if not (b.input_value and b.activation_value)]
        if missing:
            raise InputError(self.graph, f"FFN blocks {missing} have no graph values to observe")
        model = onnx.load(str(self.graph), load_external_data=False)
        existing = {o.name for o in model.graph.output}
        self.taps = [(b.layer, b.input_value, b.activation_value) for b in blocks]
        for _, x, a in self.taps:
            for name in (x, a):
                if name not in existing:
                    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                    existing.add(name)
        self.output_name = model.graph.output[0].name
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in {init.name for init in model.graph.initializer}]
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), _session_options(self.graph, threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise _decode_error(self.graph, exc) from None
        self._fetch = [x for _, x, _ in self.taps] + [a for _, _, a in self.taps]

    def feeds(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for a batch: ``input_ids`` and ``attention_mask`` [batch, seq] int64 (and
        all-zero ``token_type_ids`` when the graph has that input)."""
        feeds = {}
        for name in self.input_names:
            if name == "input_ids":
                feeds[name] = ids.astype(np.int64)
            elif name == "attention_mask":
                feeds[name] = mask.astype(np.int64)
            elif name == "token_type_ids":
                feeds[name] = np.zeros_like(ids, dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
            else:
                raise InputError(self.graph, f"graph input {name!r} is not one sparseforge can feed "
                                             "(input_ids, attention_mask, token_type_ids, position_ids)")
        return feeds

    def run(self, ids: np.ndarray, mask: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(layer, FFN input, activation) for every block, each [batch, seq, .] float32."""
        return self.run_with_output(ids, mask)[1]

    def run_with_output(self, ids: np.ndarray, mask: np.ndarray
                        ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
        """The model's first output (hidden states or logits) and the taps of :meth:`run`."""
        outs = self.session.run([self.output_name] + self._fetch, self.feeds(ids, mask))
        n = len(self.taps)
        return outs[0], [(layer, outs[1 + i], outs[1 + n + i]) for i, (layer, _, _) in enumerate(self.taps)]
