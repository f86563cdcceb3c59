"""Parallelism: running one model on a mesh of ranks (tensor, data and pipeline
parallel); see docs/parallelism.md. `comm.py` holds the communicators collectives run
on, `launch.py` starts the ranks; `strategy_for` picks a training rank's strategy."""


def strategy_for(groups, zero: bool = False, bucket_mb: float | None = None,
                 micro_batches: int = 1, schedule: str = "1f1b"):
    """The training strategy of this rank for its mesh (`strategy.check_mesh` passed):
    tensor parallel, pipeline parallel, or data parallel (what `training.fit(...,
    parallel=)` calls). Here, above both modules: data parallel's builds on strategy's."""
    from .data_parallel import BUCKET_MB, DataParallel
    from .strategy import PipelineParallel, TensorParallel, check_mesh
    mesh = groups.mesh
    check_mesh(mesh, zero=zero, micro_batches=micro_batches)
    if mesh.pp > 1:   # its stages sharded over tp if the mesh has it
        return PipelineParallel(groups, micro_batches, schedule)
    if mesh.tp > 1:
        return TensorParallel(groups)
    return DataParallel(groups, zero, BUCKET_MB if bucket_mb is None else bucket_mb)
