"""The training step: forward, loss, backward and update, eagerly or recorded once as a CUDA graph.

`Step` is the canonical Accelerate step inside `accelerator.accumulate()`; `GraphedStep` records the
same calls as one CUDA graph on one GPU and falls back to eager steps if the graph cannot be used.
"""

import torch

from .config import UsageError


class Step:
    """Forward, loss, backward and (on the last micro-step of an optimizer step) the update.

    Returns the detached loss and logits. This is the canonical Accelerate step; `GraphedStep`
    records the same calls once as a CUDA graph.
    """

    def __init__(self, accelerator, model, optimizer, criterion, skip_nonfinite: bool = False):
        self.accelerator, self.model, self.optimizer, self.criterion = accelerator, model, optimizer, criterion
        self.found_inf = None
        if skip_nonfinite and accelerator.mixed_precision != "fp16":  # fp16's loss scaler skips such steps itself
            # fused SGD skips its update on the device where found_inf is 1: no host synchronisation
            self.found_inf = torch.zeros((), device=accelerator.device)
            optimizer.optimizer.found_inf = self.found_inf
            # a skipped first step would leave fused SGD's momentum buffers allocated but never written:
            # zeros make the first real step set buf = grad, exactly as SGD's own first step does
            for group in optimizer.optimizer.param_groups:
                for parameter in group["params"] if group["momentum"] else []:
                    optimizer.optimizer.state[parameter].setdefault("momentum_buffer", torch.zeros_like(parameter))

    def __call__(self, images, labels):
        with self.accelerator.accumulate(self.model):
            logits, loss = self._forward_backward_update(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()

    def _forward_backward_update(self, images, labels):
        logits = self.model(images)
        loss = self.criterion(logits, labels)
        if self.found_inf is not None:
            torch.maximum(self.found_inf, (~torch.isfinite(loss)).float(), out=self.found_inf)
        self.accelerator.backward(loss)
        if self.found_inf is not None and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # DDP averaged one rank's non-finite gradients into every rank's: all of them must skip
            torch.distributed.all_reduce(self.found_inf, op=torch.distributed.ReduceOp.MAX)
        self.optimizer.step()
        if self.found_inf is not None and self.accelerator.sync_gradients:
            self.found_inf.zero_()
        return logits, loss


class GraphedStep(Step):
    """The step as one CUDA graph: a single launch per optimizer step instead of about a hundred.

    One CUDA process without accumulation. The first `warmup` steps run eagerly on a side stream
    (they are real training steps, and create the momentum buffers); the next one is recorded,
    then every step copies its batch into the graph's input buffers and replays. The learning rate
    is a device tensor (see build_optimizer) that the scheduler fills in place, so the graph sees it
    change. Dropout stays random: CUDA graphs advance the RNG offset on every replay.

    Graphs only make the run faster, so they must never end it: if recording or the first replay
    raises, one line says why and every later step runs eagerly.
    """

    warmup = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.graph, self.calls, self.eager, self.replays = None, 0, False, 0

    def __call__(self, images, labels):
        if self.eager:
            return super().__call__(images, labels)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = super().__call__(images, labels)
            torch.cuda.current_stream().wait_stream(side)
            return result
        try:
            if self.graph is None:
                self._record(images, labels)
            self._keep_recorded_lr()
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            if self.replays == 0:
                torch.cuda.synchronize()  # an error of the first replay shows here, while it can still fall back
            self.replays += 1
        except Exception as error:
            if self.replays:
                raise  # later replays run the graph that already worked: this is not the graph's doing
            self._fall_back(error)
            return super().__call__(images, labels)
        return self.static_loss, self.static_logits

    def _record(self, images, labels):
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.recorded_lr = [group["lr"] for group in self.optimizer.param_groups]
        if not all(isinstance(lr, torch.Tensor) for lr in self.recorded_lr):
            raise RuntimeError("the learning rate is not a device tensor (build_optimizer(lr_on_device=True))")
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes, not adds, the gradients
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a pin-memory thread, say) cannot break the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            logits, loss = self._forward_backward_update(self.static_images, self.static_labels)
        self.static_logits, self.static_loss = logits.detach(), loss.detach()

    def _keep_recorded_lr(self):
        """The graph reads the learning rate from the tensors it was recorded with: if a scheduler put
        another value (or tensor) in a parameter group, copy it into the recorded tensor and put that back."""
        for group, recorded in zip(self.optimizer.param_groups, self.recorded_lr):
            if group["lr"] is not recorded:
                recorded.fill_(float(group["lr"]))
                group["lr"] = recorded

    def _fall_back(self, error: Exception):
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self.accelerator.print(f"CUDA graphs off for this run ({type(error).__name__}: {reason[:200]}); "
                               "training continues eagerly")
        self.graph, self.eager = None, True
        self.optimizer.zero_grad(set_to_none=True)  # drop gradients a failed capture may have left


def use_cuda_graphs(cfg, accelerator, streaming: bool = False) -> bool:
    """auto: on one CUDA process without accumulation or fp16's loss scaling, and not with the stream
    loader (its pin-memory thread works on the device while a step would be recorded)."""
    possible = (accelerator.device.type == "cuda" and accelerator.num_processes == 1 and cfg.grad_accum_steps == 1
                and accelerator.mixed_precision != "fp16")
    if cfg.cuda_graphs == "auto":
        return possible and not streaming
    if cfg.cuda_graphs == "true" and not possible:
        raise UsageError("--cuda_graphs True needs one CUDA process, grad_accum_steps 1 and no fp16; use auto or False")
    return cfg.cuda_graphs == "true"
