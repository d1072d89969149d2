"""
A function recorded as a CUDA graph and replayed in one launch: llama.generate's decoding step, whose shapes are
fixed (the token, the cache slot and the static KV cache are its only inputs), so a step of a few hundred small
kernels costs one launch instead of one per kernel.

    llama.generate(model, tokens, mask, 100, cuda_graph=True)     # on a CUDA device
Tests: python -m pytest tests/test_gpu.py tests/test_llama.py -k "graph or recorded"
"""
import torch


def capture(fn, *args):
    """fn recorded as a CUDA graph: the function returned copies its arguments into the recorded inputs and
    replays fn's kernels in one launch. The graph holds exactly the eager kernels (tested token for token); the
    sampling, whose random numbers a graph would freeze, stays outside. The warm-up runs fn once on args."""
    inputs = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (cuBLAS handles, attention plans) on a side stream, as capture asks
        fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*inputs)

    def replay(*args):
        for x, a in zip(inputs, args):
            x.copy_(a)
        graph.replay()
        return output  # overwritten by the next replay
    return replay
