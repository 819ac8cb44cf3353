"""Empirical privacy audit: what an attacker actually manages, beside each epsilon.

The accountant's epsilon is only as good as the code that releases; a bug in
what is released is invisible to any accountant test. These units measure the
released thing instead, one adversary per unit of privacy:

* Photo level (``one_run``): the adversary is the server, which sees each
  device's update. Canary photos are planted, each included by a secret fair
  coin; the server scores every canary from the updates (e.g. the update's
  alignment with the canary's clipped gradient) and guesses which were in. The
  one-run bound of Steinke, Nasr and Jagielski turns the right guesses into a
  *lower bound* on epsilon that holds at 95% confidence: above the theory means
  the mechanism is broken.
* User level (``canary_devices``): the adversary is anyone who sees the released
  models. Canary devices send a random direction scaled to the clip; the cosine
  between each direction and the final model change, against directions never
  inserted, gives the one-shot *estimate* of Andrew et al. with a bootstrap
  interval.

Why a lower bound far below the theoretical epsilon is expected, not alarming:
the accountant bounds the worst case over all pairs of neighbouring datasets and
all adversaries who see every intermediate release, composed by inequalities
that are tight only asymptotically; the audit measures one attack on typical
data, with the final model only at the user level, and a one-run bound with m
canaries cannot exceed a ceiling that grows like log m (5.78 for m = 1000 at
delta = 1e-5, less after choosing k, less again at larger delta). What can be
read from it is the other direction: a lower bound above the theory is a bug.

The experiment runner (``experiments.audit``) plants canaries, computes scores
and cosines, and logs; this package is only the statistics, free of Flower and
MLflow. Nothing here touches a real run's ledger.
"""
