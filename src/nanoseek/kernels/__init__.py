"""Fast paths of the model: each computes what its model/ reference computes, with less memory or time.

    norm.py           FusedRMSNorm (RMSNormFunction: x and rstd kept, not the output) and
                      recomputed_norm_outputs() (norm outputs saved for backward are recomputed there)
    swiglu.py         FusedSwiGLU and swiglu_down (SwiGLU Functions: the hidden recomputed in backward)
    cross_entropy.py  linear_cross_entropy (head + loss in row chunks; the logits never held whole)
    grouped_mm.py     GroupedExperts (one grouped matmul for all routed experts; opaque ops for compile)
    grouped_gemm.py   grouped_mm (torch._grouped_mm, with bucketed row counts for bf16 on the CPU)
    dsa.py            SparseLatentAttention (DSA's long prefill: dense prefix, then each query's picks,
                      `GatheredAttention` recomputed in backward; the values are the keys' prefix)
    native.py         builds the C++ kernels in csrc/ on first use (GatheredAttention's fp32 CPU path)
    block_attention.py  block_sparse_attention (each query block over its chosen key blocks: heads
                      folded into rows, two GEMMs and an in-place softmax per tile, recomputed in
                      backward) and sliding_window_attention (a window as such tiles)
    nsa.py            ChunkedNativeSparseAttention (NSA's compressed branch in query chunks, p recomputed
                      in backward: `CompressedBlockAttention`; its selected and window branches as tiles)
    window.py         TiledWindowAttention (MHA's sliding window as tiles; MLA's through dsa.py's subclass)
    csa.py            SparseCompressedAttention (V4 CSA's long prefill: each query over its window, its
                      picked entries and the sink, through dsa.py's `GatheredAttention`; HCA and V4
                      sliding layers as block_attention.py's tiles)

How they are chosen: model/ never imports this package. model/transformer.py keeps two registries
that importing this package fills (as nanoseek.io fills CHECKPOINT_WRITERS):
    KERNEL_MODULES[ReferenceClass] = FastSubclass   (RMSNorm, SwiGLU, RoutedExperts, NativeSparseAttention,
                                                     MultiHeadAttention, MultiHeadLatentAttention,
                                                     CompressedAttention)
    KERNEL_FUNCTIONS[name] = function               ("linear_cross_entropy", "training_forward")
A `Transformer` built with `ModelConfig.kernels` (default True; `--model.kernels=false` turns it off)
swaps each reference module's class for its fast subclass (`Transformer.set_kernels`: parameters,
buffers and the state dict are unchanged, so checkpoints do not know) and looks the functions up
when it runs. `import nanoseek` imports this package, so every user of the library gets the fast
paths; with `kernels=false` the model is the plain reference. tests/kernels/test_kernels.py
checks each fast path against its reference, values and gradients.

    >>> from nanoseek import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.from_preset("llama-tiny"))
    >>> type(model.norm).__name__
    'FusedRMSNorm'
"""

from nanoseek.kernels import cross_entropy, csa, dsa, grouped_mm, norm, nsa, swiglu, window
from nanoseek.model.attention.compressed import CompressedAttention
from nanoseek.model.attention.mha import MultiHeadAttention
from nanoseek.model.attention.mla import MultiHeadLatentAttention
from nanoseek.model.attention.nsa import NativeSparseAttention
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.moe.experts import RoutedExperts
from nanoseek.model.norm import RMSNorm
from nanoseek.model.transformer import KERNEL_FUNCTIONS, KERNEL_MODULES

KERNEL_MODULES.update(
    {
        RMSNorm: norm.FusedRMSNorm,
        SwiGLU: swiglu.FusedSwiGLU,
        RoutedExperts: grouped_mm.GroupedExperts,
        NativeSparseAttention: nsa.ChunkedNativeSparseAttention,
        MultiHeadAttention: window.TiledWindowAttention,
        MultiHeadLatentAttention: dsa.SparseLatentAttention,
        CompressedAttention: csa.SparseCompressedAttention,
    }
)
KERNEL_FUNCTIONS.update(
    linear_cross_entropy=cross_entropy.linear_cross_entropy, training_forward=norm.recomputed_norm_outputs
)
