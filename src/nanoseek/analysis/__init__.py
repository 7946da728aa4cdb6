"""Looking into a trained model: attention maps and fusion weights as pictures (`nanoseek inspect`),
and sentence vectors (`nanoseek embed`)."""

from nanoseek.analysis.attention import attention_maps, plot_attention
from nanoseek.analysis.fusion import fusion_picture, plot_fusion

__all__ = ["attention_maps", "fusion_picture", "plot_attention", "plot_fusion"]
