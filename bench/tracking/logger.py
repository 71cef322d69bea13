"""The run logger: what the trainer and a study write into one MLflow run, batched, by run id."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from bench.tracking.plots import FIGURES
from bench.tracking.store import quiet_logger


class RunLogger:
    """Batched logging into one MLflow run.

    A resumed run replays the steps between its last checkpoint and the interruption; ``skip_logged()``
    makes the logger drop what the run's history already holds, so each step is logged once.
    """

    def __init__(self, c, run_id: str, model_id: str | None = None):
        self.client, self.run_id = c, run_id
        self.model_id = model_id  # the run's LoggedModel, which the metrics logged from now on are linked to
        self._logged: dict[str, int] = {}  # metric key -> last step already in the run's history

    def skip_logged(self) -> None:
        """From now on, drop metrics (and images) at steps the run's history already holds."""
        # MLflow's own ``system/*`` metrics count their steps in samples (one per 10 s), not training steps:
        # taken for ours, their larger steps would make every later sample grid look logged already.
        keys = [k for k in self.client.get_run(self.run_id).data.metrics if not k.startswith("system/")]
        self._logged = {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1)
                        for k in keys}

    def _new(self, key: str, step: int) -> bool:
        return step > self._logged.get(key, -1)

    def params(self, params: dict) -> None:
        from mlflow.entities import Param  # heavy: mlflow loads only where a run is recorded

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # heavy: mlflow loads only where a run is recorded

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step, model_id=self.model_id)
                 for k, v in values.items() if self._new(k, step)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag  # heavy: mlflow loads only where a run is recorded

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def dataset(self, images, name: str, context: str) -> None:
        """The training data as an MLflow dataset input (a digest of the pixels, not a copy)."""
        import mlflow.data  # heavy: mlflow loads only where a run is recorded
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        source = CodeDatasetSource({"loader": f"bench.data.datasets.load_dataset({name!r}, split={context!r})"})
        ds = mlflow.data.from_numpy(images.numpy(), source=source, name=f"{name}-{context}")
        inputs = [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception:  # noqa: BLE001 - two runs registering the same dataset at once:
            time.sleep(0.5)  # the second finds it on a retry
            self.client.log_inputs(self.run_id, datasets=inputs)

    def image(self, array, key: str, step: int) -> None:
        if self._logged and step <= max(self._logged.values()):  # logged with that step's metrics before
            return
        self.client.log_image(self.run_id, array, key=key, step=step)

    def figure(self, fig, path: str) -> None:
        with FIGURES:  # drawn by matplotlib, which is not thread-safe
            self.client.log_figure(self.run_id, fig, path)

    def artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def dict(self, data: dict, path: str) -> None:
        self.client.log_dict(self.run_id, data, path)

    def note(self, text: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content``, shown as the run page's Description)."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE  # heavy: mlflow loads only where a run is recorded

        self.tags({MLFLOW_RUN_NOTE: text})

    def note_section(self, heading: str, text: str) -> None:
        """Set the section ``heading`` of the run's description to ``text`` (replacing an earlier one)."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE  # heavy: mlflow loads only where a run is recorded

        note = self.client.get_run(self.run_id).data.tags.get(MLFLOW_RUN_NOTE, "")
        mark = f"\n\n**{heading}**"
        self.note(note.split(mark)[0].rstrip() + f"{mark}: {text}")

    def model(self, net, example: tuple, step: int, metadata: dict | None = None, name: str = "model") -> str:
        """``net`` (a float32 CPU copy) as an MLflow 3 model of this run: a LoggedModel named ``name`` (the experiment's
        Models tab and the run page list it) with the run's params, linked to the metrics the run logged at ``step``.
        Returns its id: ``mlflow.pytorch.load_model("models:/<id>")`` gives a module called as ``net`` is.

        Saved as a ``torch.export`` program (MLflow's ``pt2`` format), traced on ``example`` (a batch of at least 2,
        so the batch size stays free): a graph and tensors, no pickled objects, which MLflow checks when it loads
        one with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` (a pickled model would run code when loaded)."""
        import mlflow.pytorch  # heavy: only the final model needs it
        from mlflow.models import ModelSignature
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
        from mlflow.types import Schema, TensorSpec

        module = copy.deepcopy(net).float().cpu().eval().to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            out = module(*example)

        def spec(x, name=None):
            return TensorSpec(np.dtype(str(x.dtype).removeprefix("torch.")), (-1, *x.shape[1:]), name)

        signature = ModelSignature(inputs=Schema([spec(example[0], "x_t"), spec(example[1], "t")]),
                                   outputs=Schema([spec(out)]))
        run = self.client.get_run(self.run_id)
        logged = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id,
                                                 params=run.data.params)
        # mlflow.pytorch logs through the global tracking URI: this run's store while it logs
        with _use_tracking_uri(self.client.tracking_uri), quiet_logger("mlflow"):
            mlflow.pytorch.log_model(module, name=name, model_id=logged.model_id, run_id=self.run_id, step=step,
                                     serialization_format="pt2", input_example=example, signature=signature,
                                     metadata=metadata, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        return logged.model_id

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
