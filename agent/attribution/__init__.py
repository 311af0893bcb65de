"""Attribution: splits each GPU's and the host's measured energy among inference requests.

The rules (docs/design.md §5, which says why) are these:

- Each interval between two consecutive points of a timeline has energy ΔE, unless its later
  point is a gap (then nothing is attributed and nothing counted). With no active request,
  all of ΔE is unattributed. On a GPU, the idle-baseline energy of the part of the interval
  when no request was active, `min(ΔE, P_idle × empty_s)`, is unattributed too: energy with
  no active request belongs to nobody, inside an interval as between intervals. The rest
  splits into a static part `min(rest, P_idle × occupied_s)` and a dynamic part (what is
  left); host energy has no static part. Both parts go to the requests active in the
  interval in proportion to their weight.
- `equal` policy: a request weighs its overlap with the interval, in seconds.
- `tokens` policy: a request weighs the tokens it processed in the interval, its prompt
  tokens × the prefill weight spread uniformly over [start, first token) and its completion
  tokens over [first token, end). Where the first token does not split the lifetime in two
  (unknown, or at either end), both counts are spread over [start, end). Where a token count
  is unknown, the request weighs its overlap times the mean token rate of the requests with
  known tokens in the same interval (or plain overlap if there are none): it is assumed to
  be an average request, instead of mixing seconds and tokens. If every active request
  weighs zero (all token counts zero), the interval is split by overlap.
- Queue-aware intervals (`tokens` policy with `"auto"`): where every request active in an
  interval says when its server began on it (`Request.scheduled`) and the GPU's costs of a
  prompt and of a completion token alone have been measured (on samples of requests
  running alone), the static part goes by presence, each prompt token gets its cost alone
  scaled by the board's recent saturation (dynamic energy ÷ what the work costs alone, at
  most 1), at most the dynamic part, and the completion tokens get the rest
  (`lane._queue_aware_step`; docs/benchmarks.md says why: under continuous batching a
  weighted split gives prefill too little).
- Prefill weight: a fixed number, or `"auto"` (the default), which measures it per GPU as
  the ratio of dynamic energy per prompt token to dynamic energy per completion token
  (`learners.PrefillWeightLearner`). Until a GPU's weight has first been measured, its
  intervals are split by overlap, as under `equal`: a prompt token costs one to two orders
  of magnitude less than a generated one on current hardware, so a guessed weight such as
  1.0 would hand most of a busy interval to whichever request is in prefill, whereas time
  is a neutral proxy. Once measured, the last measured weight is held while the load (a board at its
  power limit, say) does not let it be measured again. The weight in use applies to the
  intervals processed while it is in use: figures already credited stay as they are, and
  since weights only split an interval's energy, conservation holds whatever the weight
  does. The host, which has no idle baseline to separate dynamic energy from, splits by
  overlap under `"auto"`.
- Idle power: configured per GPU, or learned as a low percentile of the power of stretches
  with no active request. Until something is learned it is taken as 0 W, so all GPU energy
  counts as dynamic: the IT total is exact either way and only the static/dynamic split
  waits for a measurement, whereas any guessed baseline would be a silent error.
  `idle_power_w()` returns None until then, so exporters can show that it is not known.

When intervals are processed: an interval is processed once it has settled (its end is at
least `settle_s` old, so that batched start events have arrived; longer on a GPU fed by a
trace source, whose spans come only after their requests end, and on the host, which every
request shares, as long as the longest) and every request that overlaps it has ended; a
request still open after `max_age_s` is closed at `start + max_age_s` and marked expired.
A request is final once every timeline it uses has been processed past its end; a timeline
with no point for `max_age_s` is considered stalled and its waiting requests are finalised
with what was measured. A request reported after intervals it overlapped were processed
gets only the unprocessed part (`late`).

`learners` holds what is learned per GPU (idle power, prefill weight), `lane` the sweep of
one timeline (the interval arithmetic, and `static_share`, the static/dynamic rule that
window figures use too), `engine` the AttributionEngine that accepts requests and drives
the lanes.
"""

from agent.attribution.engine import (
    DEFAULT_PREFILL_WEIGHT,
    AttributionEngine,
    AttributionTotals,
    CapacityExceeded,
    GpuTotals,
    HostTotals,
)
from agent.attribution.lane import static_share
from agent.attribution.learners import PREFILL_WEIGHT_BOUNDS

__all__ = [
    "DEFAULT_PREFILL_WEIGHT", "PREFILL_WEIGHT_BOUNDS", "AttributionEngine", "AttributionTotals",
    "CapacityExceeded", "GpuTotals", "HostTotals", "static_share",
]
