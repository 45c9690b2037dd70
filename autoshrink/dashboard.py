"""What optuna-dashboard shows besides the study itself: the Pareto members' model files."""

from __future__ import annotations

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

from autoshrink.config import SearchConfig
from autoshrink.pareto import baseline_from_study, pareto_front, records_from_study


def attach_pareto_models(study: optuna.Study,
                         config: SearchConfig) -> tuple[FileSystemArtifactStore, list[str]]:
    """Upload each feasible Pareto member's model file as a study artifact (once; Optuna does
    not let finished trials take artifacts). Returns the store and the attached file names."""
    folder = config.run_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(folder))
    baseline = baseline_from_study(study)
    records = records_from_study(study)
    members = sorted({r.number for metric in ("params", "flops", "size")
                      for r in pareto_front(records, metric, baseline, config.budget).members})
    present = {meta.filename for meta in get_all_artifact_meta(study)}
    attached = []
    for number in members:
        path = config.run_dir / "models" / f"trial-{number}.pt"
        if not path.is_file():
            continue
        if path.name not in present:
            upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                            mimetype="application/octet-stream")
        attached.append(path.name)
    return store, attached
