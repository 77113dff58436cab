"""The host's view of a PlugCache's rows and of the forward under way: the one handshake between the patcher's
hooks (which prepare a forward on eager code), the attention forwards and the cache layers (which run it).

A forward goes idle -> prepared (`prepare`: the host work is done, blocks are mapped) -> running (`claim`: the
decoder took it) -> idle (`layer_done` of the last attention layer). A forward compiled as a whole, with no eager
code before it, goes idle -> traced (`traced`): only the device knows the lengths then, and the next eager use reads
them (`synced`). Anything but idle means "open": if the next forward finds one open, the last one stopped part-way
or never ran, and the cache checks its layers before going on.
"""

from __future__ import annotations

import weakref
from typing import Callable

IDLE, PREPARED, RUNNING, TRACED = "idle", "prepared", "running", "traced"


class ForwardState:
    """Rows and forward of one cache (plain Python; the layers read it, only its transitions write it).

    batch: active rows. length: tokens each holds (host count); None when only the device knows (`traced`).
    holes: the recorded attention mask has a 0 after a 1 somewhere (the kernels then read the slot mask).
    top: the most tokens the rows held since the last reset (a sliding-window ring holds [top - ring, length)).
    leaders: rows of a prefill whose K/V are stored for their whole group (generate()'s expanded rows), or None.
    pending: tokens the open forward adds. phase, shape: where the forward is, and (batch, q_len) it was prepared for.
    eager: whether the open forward's layers attend with the model's eager attention, as its first attention layer
    found (the same config reaches every layer); None until then.
    broken: what stopped part-way among changes that must all happen (a crop, a reorder, a copy on write, a reset:
    an out-of-memory error or KeyboardInterrupt inside), or None: the rows are not known then, and every use but
    reset() raises (`check_whole`).
    `sync` reads the device's lengths when the host lost count (set by the cache that owns this state).
    """

    def __init__(self, sync: Callable[[], None]):
        self._sync = weakref.WeakMethod(sync)  # the owner's method, held weakly: no cycle keeps a dropped cache alive
        self.reset()

    def reset(self) -> None:
        self.batch, self.length, self.holes, self.top = 0, 0, False, 0
        self.leaders: list[int] | None = None
        self.pending = 0
        self.phase, self.shape = IDLE, None
        self.eager: bool | None = None
        self.broken: str | None = None

    def broke(self, what: str) -> None:
        """Changes that must all happen stopped part-way (`what`): nothing but reset() may use the rows now."""
        self.broken = what

    def check_whole(self) -> None:
        """Raise if changes to the rows stopped part-way (`broke`)."""
        if self.broken is not None:
            raise RuntimeError(f"the PlugCache's {self.broken}, so what its rows hold is not known; call "
                               "cache.reset() (its blocks go back to the pool) and run the request again")

    @property
    def open(self) -> bool:
        return self.phase != IDLE

    def length_now(self) -> int:
        """The tokens each row holds, reading the device only where the host lost count."""
        if self.length is None:
            self._sync()()
        return self.length

    def seq_length(self) -> int:
        """What `get_seq_length()` reports: the tokens held before the open forward, if one is open."""
        n = self.length_now()
        return n - self.pending if self.open else n

    # --- transitions ----------------------------------------------------------------------------------

    def prepare(self, batch: int, q_len: int, leaders: list[int] | None) -> None:
        """The host work of a forward of `batch` rows x `q_len` new tokens is done (blocks mapped, mask recorded)."""
        self.batch, self.length = batch, self.length + q_len
        self.top = max(self.top, self.length)
        self.leaders, self.pending = leaders, q_len
        self.phase, self.shape = PREPARED, (batch, q_len)
        self.eager = None

    @property
    def prepared(self) -> bool:
        return self.phase == PREPARED

    def is_prepared(self, batch: int, q_len: int) -> bool:
        return self.phase == PREPARED and self.shape == (batch, q_len)

    def claim(self) -> None:
        """The decoder (or a layer called directly) takes the prepared forward: the hooks of later modules leave it."""
        self.phase = RUNNING

    def abandon(self) -> None:
        """The prepared forward may never run (its generate() call failed): the next one prepares again, and finds
        this one open."""
        if self.phase == PREPARED:
            self.phase = RUNNING

    def eager_decided(self, eager: bool) -> None:
        """The open forward's first attention layer found whether the model attends with its eager attention."""
        self.eager = eager

    def layer_done(self, last: bool) -> None:
        """An attention layer ran; the last one ends the forward. (An attribute store: torch.compile replays it after
        a compiled graph, so this holds there too.)"""
        if last:
            self.phase = IDLE

    def traced(self, batch: int) -> None:
        """A forward compiled as a whole runs with no eager code before it: only the device will know the count."""
        self.batch, self.length, self.leaders = batch, None, None
        self.phase, self.eager = TRACED, None

    def mask_recorded(self, holes: bool) -> None:
        """The forward's attention mask was recorded on the devices; `holes`: it has a 0 after a 1 somewhere."""
        self.holes = holes

    def cropped(self, length: int) -> None:
        """The rows were cut back to `length` tokens (assisted decoding's rejected drafts)."""
        self.length = length

    def selected(self, batch: int) -> None:
        """The rows were reordered or selected (beam search): `batch` of them now."""
        self.batch = batch

    def restore(self, batch: int, length: int, holes: bool, top: int) -> None:
        """Rows that another cache or a file held (a fork, a copy, a load)."""
        self.batch, self.length, self.holes, self.top = batch, length, holes, top

    def synced(self, length: int) -> None:
        """The device's lengths were read and found consistent: the host's count again."""
        self.length = length
        self.top = max(self.top, length)
        self.pending = 0
        self.phase, self.shape = IDLE, None
