"""The pipeline x tensor x data process groups, from the topology DeepSpeed's pipeline grid uses too."""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology


class ParallelState:
    """This rank's place in the pp x tp x dp grid and its process groups.

    Rank order follows DeepSpeed (axes pipe, data, model; model fastest): for pp 2 x tp 2 the
    tensor-parallel groups are ranks [0, 1] and [2, 3]. Every rank creates every group, in the same
    order (gloo and NCCL require it). It also serves as the ``mpu`` DeepSpeed needs for tensor
    parallelism without a pipeline.
    """

    def __init__(self, pipe_parallel_size: int, model_parallel_size: int):
        world = dist.get_world_size()
        pp, tp = pipe_parallel_size, model_parallel_size
        if world % (pp * tp):
            raise ValueError(f"world size {world} is not divisible by pipe_parallel_size {pp} x model_parallel_size {tp}")
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (pp * tp))
        self.rank = dist.get_rank()
        coord = self.topology.get_coord(self.rank)
        self.pp_rank, self.dp_rank, self.tp_rank = coord.pipe, coord.data, coord.model
        self.pp_size, self.tp_size, self.dp_size = pp, tp, world // (pp * tp)
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.group_ranks: dict[str, list[int]] = {}
        for axis in ("model", "data", "pipe"):
            for ranks in self.topology.get_axis_comm_lists(axis):
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.groups[axis], self.group_ranks[axis] = group, ranks
        # Model-parallel in DeepSpeed's sense (gradient-norm reduction, checkpoint names) spans tensor ranks only
        # when there is no pipeline; with a pipeline the engine uses the PipelineModule's own grid.

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.groups["model"]

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.groups["data"]

    # --- the mpu interface deepspeed.initialize(mpu=...) expects (tensor parallel, no pipeline) ---
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
