"""The aggregator management system (AMS): not built yet.

Flexibility registry, offers, ranking, activation, verification and the VPP optimisation
arrive with the AMS issues; the package exists so the layout of the design brief holds.
"""
