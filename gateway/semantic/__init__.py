"""Self-describing messages exchanged with the aggregator (AMS): not built yet.

The message model (HEILA information objects with a JSON-LD context, signing and
encryption) lands here with the messaging issue; the package exists so the layout of the
design brief holds from the start and nothing else grows a message model meanwhile.
"""
