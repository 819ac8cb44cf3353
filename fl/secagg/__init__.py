"""SecAgg+ (Bell et al. 2020) for fedface's own round loop, from Flower's primitives.

Flower 1.41 ships SecAgg+ only on its legacy path (``SecAggPlusWorkflow`` with a
``LegacyContext``), which a Message-API round loop cannot use; it does ship the
primitives in ``flwr.common.secure_aggregation``. This package is the protocol
itself, pure (no Grid, no ClientApp), so it is tested without Flower:

* ``fl.secagg.params``: the round's protocol parameters, the neighbour graph,
  the message types and record keys (the schema both sides share);
* ``fl.secagg.quantize``: clip to C, quantize into the field, decode the sum
  (the bounds ``docs/privacy.md`` states);
* ``fl.secagg.masks``: pairwise and self masks, a CSPRNG stream per key;
* ``fl.secagg.device``: one device's side of one round (keys, shares, mask,
  unmask), with the checks an honest device makes on the server's requests;
* ``fl.secagg.server``: the server's bookkeeping (neighbours, routing, sums,
  reconstruction), with the typed validation of every device reply.

Trust: an honest-but-curious server only. Devices cannot authenticate each
other's keys (no PKI) and there is no consistency-check round, so a server that
substitutes public keys or sends split survivor views reads one device's update
(``fl.secagg.device``, docs/privacy.md).

The Flower glue is ``server.secure_aggregation`` (stages over the Grid) and
``clients.secagg`` (the ClientApp's handlers).
"""
