"""IED simulators that stand in for field devices when the real ones are not on the bench.

They are part of the product, not test helpers: a lab runs the gateway against them
(``iedsim`` console script) and the HIL suites start them in-process. Every simulator is
driven by the same lab config and point model as the adapters, so an address or scale
mistake shows up the same way on the simulator as on the real device.

Each protocol has its own subpackage (``iec104`` now; ``dlms`` and ``iec61850`` later); the
feeder physics in :mod:`gateway.iedsim.dynamics` is shared by all of them.
"""
