"""fox_megatron.kernels: forgetting attention kernels, independent of Megatron.

Usable on its own, like flash-attn's interface: torch + triton only.

    from fox_megatron.kernels import forgetting_attention, AcpConfig
    o = forgetting_attention(q, k, v, log_fgate, acp=AcpConfig())
"""

from .forgetting_attn import *  # noqa: F401,F403
from .forgetting_attn import __all__  # noqa: F401
