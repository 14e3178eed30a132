"""The encoder and decoder as graphs of tile-local operations, for exact tiling (no torch, no jax).

Every operation of the VAE except GroupNorm's statistics and the mid-block attention is local: an output pixel
depends on a small window of its inputs. The graph below lists the decoder (or encoder) as such local
operations between *nodes* (named activations), so a backend can compute any node over any rectangle of the
image from stored nodes, given the GroupNorm statistics of the nodes a norm reads. Nodes and modules are named
by the model's attribute paths (``decoder.up_blocks.3.resnets.0.conv1``), which both backends share.

Coordinates: a node's spatial size is the latent size times ``node.scale`` (pixels per latent pixel), so
one latent-unit tile grid lines up at every resolution. Regions are ``(r0, r1, c0, c1)``, half-open, in the
node's own pixels, always clipped to the node's bounds; convolutions zero-pad at the image border only.
"""

from __future__ import annotations

import dataclasses

from klvae.config import AutoencoderKLConfig

# Operations. Each computes one node from its inputs over a rectangle.
INPUT = "input"                  # the given tensor (latents for decode, images for encode)
CONV = "conv"                    # stride-1 convolution, zero padding kernel // 2
NORM_ACT_CONV = "norm_act_conv"  # conv(act(GroupNorm(x))) with the GroupNorm statistics of the whole x
UP_CONV = "up_conv"              # conv(nearest_2x(x)), 3x3, padding 1
DOWN_CONV = "down_conv"          # conv(pad(x, (0, 1, 0, 1))), 3x3, stride 2, no padding
ADD = "add"                      # inputs[0] + inputs[1] (the resnet's residual)
GLOBAL = "global"                # a module run on the whole tensor (the mid-block attention)

Region = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...] = ()
    channels: int = 0
    scale: int = 1             # node pixels per latent pixel, along each side
    conv: str | None = None    # module path of the convolution
    kernel: int = 1
    norm: str | None = None    # NORM_ACT_CONV: module path of the GroupNorm applied to inputs[0]
    groups: int = 0            # NORM_ACT_CONV: GroupNorm groups
    act: str | None = None     # NORM_ACT_CONV: module path of the activation
    module: str | None = None  # GLOBAL: module path of the module run on the whole tensor
    flops: float = 0.0         # floating-point operations per output position, for the cost model
    storable: bool = True      # False: always recomputed (a resnet's last conv, read only by its residual add)

    @property
    def halo(self) -> int:
        """Extra input pixels needed on each side of an output rectangle (in the input's pixels)."""
        if self.op in (CONV, NORM_ACT_CONV):
            return self.kernel // 2
        if self.op in (UP_CONV, DOWN_CONV):
            return 1
        return 0


@dataclasses.dataclass(frozen=True)
class Graph:
    """Nodes in execution order; ``input`` is the given tensor, ``output`` the result."""

    kind: str  # "decode" or "encode"
    nodes: tuple[Node, ...]
    input: str
    output: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {n.name: i for i, n in enumerate(self.nodes)})
        consumers: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                consumers[i].append(n.name)
        object.__setattr__(self, "_consumers", {k: tuple(v) for k, v in consumers.items()})

    def __getitem__(self, name: str) -> Node:
        return self.nodes[self._index[name]]

    def index(self, name: str) -> int:
        return self._index[name]

    def consumers(self, name: str) -> tuple[str, ...]:
        return self._consumers[name]

    @property
    def barriers(self) -> frozenset[str]:
        """Nodes whose GroupNorm statistics some operation needs (the input of every norm)."""
        return frozenset(n.inputs[0] for n in self.nodes if n.op == NORM_ACT_CONV)

    @property
    def output_scale(self) -> int:
        return self[self.output].scale


# ---------------------------------------------------------------------------------------------- construction
class _Builder:
    def __init__(self, config: AutoencoderKLConfig):
        self.config = config
        self.nodes: list[Node] = []
        self.scale = 1

    def add(self, node: Node) -> str:
        self.nodes.append(node)
        return node.name

    def conv(self, name: str, src: str, cin: int, cout: int, kernel: int, *, op: str = CONV, conv: str,
             **extra) -> str:
        flops = 2.0 * kernel * kernel * cin * cout
        if op == NORM_ACT_CONV:
            flops += 8.0 * cin  # normalise, activate (elementwise passes over the input)
        return self.add(Node(name, op, (src,), cout, self.scale, conv=conv, kernel=kernel, flops=flops, **extra))

    def resnet(self, prefix: str, x: str, cin: int, cout: int) -> str:
        groups, act = self.config.norm_num_groups, f"{prefix}.nonlinearity"
        h = self.conv(f"{prefix}.h", x, cin, cout, 3, op=NORM_ACT_CONV, conv=f"{prefix}.conv1",
                      norm=f"{prefix}.norm1", groups=groups, act=act)
        t = self.conv(f"{prefix}.t", h, cout, cout, 3, op=NORM_ACT_CONV, conv=f"{prefix}.conv2",
                      norm=f"{prefix}.norm2", groups=groups, act=act, storable=False)
        skip = x if cin == cout else self.conv(f"{prefix}.s", x, cin, cout, 1, conv=f"{prefix}.conv_shortcut")
        return self.add(Node(f"{prefix}.o", ADD, (skip, t), cout, self.scale, flops=float(cout)))

    def mid_block(self, prefix: str, x: str, channels: int) -> str:
        x = self.resnet(f"{prefix}.resnets.0", x, channels, channels)
        if self.config.mid_block_add_attention:
            x = self.add(Node(f"{prefix}.attentions.0", GLOBAL, (x,), channels, self.scale,
                              module=f"{prefix}.attentions.0"))
        return self.resnet(f"{prefix}.resnets.1", x, channels, channels)

    def norm_out(self, prefix: str, x: str, cin: int, cout: int) -> str:
        return self.conv(f"{prefix}.conv_out", x, cin, cout, 3, op=NORM_ACT_CONV, conv=f"{prefix}.conv_out",
                         norm=f"{prefix}.conv_norm_out", groups=self.config.norm_num_groups, act=f"{prefix}.conv_act")


def decoder_graph(config: AutoencoderKLConfig) -> Graph:
    """post_quant_conv, then the decoder, as tile-local operations at latent scale 1 up to ``downsample_factor``."""
    b = _Builder(config)
    chans = tuple(reversed(config.decoder_channels))
    lat = config.latent_channels
    x = b.add(Node("z", INPUT, (), lat, 1))
    if config.use_post_quant_conv:
        x = b.conv("post_quant_conv", x, lat, lat, 1, conv="post_quant_conv")
    x = b.conv("decoder.conv_in", x, lat, chans[0], 3, conv="decoder.conv_in")
    x = b.mid_block("decoder.mid_block", x, chans[0])
    for i, c in enumerate(chans):
        cin = chans[max(i - 1, 0)]
        for j in range(config.layers_per_block + 1):
            x = b.resnet(f"decoder.up_blocks.{i}.resnets.{j}", x, cin if j == 0 else c, c)
        if i < len(chans) - 1:
            b.scale *= 2
            x = b.conv(f"decoder.up_blocks.{i}.upsamplers.0", x, c, c, 3, op=UP_CONV,
                       conv=f"decoder.up_blocks.{i}.upsamplers.0.conv")
    out = b.norm_out("decoder", x, chans[-1], config.out_channels)
    return Graph("decode", tuple(b.nodes), "z", out)


def encoder_graph(config: AutoencoderKLConfig) -> Graph:
    """The encoder, then quant_conv, as tile-local operations from scale ``downsample_factor`` down to 1."""
    b = _Builder(config)
    chans = config.block_out_channels
    b.scale = config.downsample_factor
    x = b.add(Node("x", INPUT, (), config.in_channels, b.scale))
    x = b.conv("encoder.conv_in", x, config.in_channels, chans[0], 3, conv="encoder.conv_in")
    for i, c in enumerate(chans):
        cin = chans[max(i - 1, 0)]
        for j in range(config.layers_per_block):
            x = b.resnet(f"encoder.down_blocks.{i}.resnets.{j}", x, cin if j == 0 else c, c)
        if i < len(chans) - 1:
            b.scale //= 2
            x = b.conv(f"encoder.down_blocks.{i}.downsamplers.0", x, c, c, 3, op=DOWN_CONV,
                       conv=f"encoder.down_blocks.{i}.downsamplers.0.conv")
    x = b.mid_block("encoder.mid_block", x, chans[-1])
    moments = 2 * config.latent_channels
    x = b.norm_out("encoder", x, chans[-1], moments)
    if config.use_quant_conv:
        x = b.conv("quant_conv", x, moments, moments, 1, conv="quant_conv")
    return Graph("encode", tuple(b.nodes), "x", x)


# ---------------------------------------------------------------------------------------------- regions
def node_size(node: Node, latent_hw: tuple[int, int]) -> tuple[int, int]:
    return latent_hw[0] * node.scale, latent_hw[1] * node.scale


def clip(region: Region, size: tuple[int, int]) -> Region:
    r0, r1, c0, c1 = region
    return max(r0, 0), min(r1, size[0]), max(c0, 0), min(c1, size[1])


def bbox(a: Region | None, b: Region) -> Region:
    """The smallest rectangle holding both (``a`` may be None)."""
    if a is None:
        return b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def input_region(node: Node, region: Region, in_size: tuple[int, int]) -> Region:
    """The rectangle of ``node``'s inputs needed to compute ``region`` of ``node`` (clipped to the input)."""
    r0, r1, c0, c1 = region
    if node.op in (CONV, NORM_ACT_CONV):
        p = node.kernel // 2
        return clip((r0 - p, r1 + p, c0 - p, c1 + p), in_size)
    if node.op == UP_CONV:  # rows r of the upsampled map come from input row r // 2
        u0, u1, v0, v1 = clip((r0 - 1, r1 + 1, c0 - 1, c1 + 1), (2 * in_size[0], 2 * in_size[1]))
        return u0 // 2, (u1 + 1) // 2, v0 // 2, (v1 + 1) // 2
    if node.op == DOWN_CONV:  # output row r reads padded input rows 2r .. 2r + 2; row H is the zero pad
        return clip((2 * r0, 2 * r1 + 1, 2 * c0, 2 * c1 + 1), in_size)
    if node.op == ADD:
        return region
    raise ValueError(f"{node.op} nodes have no local input region")


def halo_in_input(node: Node) -> tuple[int, int]:
    """(numerator, denominator): an output margin of m pixels needs about m * num / den + halo input pixels."""
    if node.op == UP_CONV:
        return 1, 2
    if node.op == DOWN_CONV:
        return 2, 1
    return 1, 1
