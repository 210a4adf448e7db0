"""``mgms bench``: latency of the HEILA routes on simulators, next to each protocol's floor;
``mgms bench --lab``: the same routes on a running lab, from the probes below (``lab.py``).

Probe hops, i.e. the timestamps the running system stores anyway and the bench reads back
(wall clock of the host that writes them; ``Redis TIME`` where Redis writes them):

Field values (``P:point:{name}`` hash, ``P:hist:{name}`` / ``P:changes`` streams)
  ``source_ts``/``src`` device time stamp (CP56Time2a, 61850 ``t``) when the device sends one;
  ``recv_ts``/``rcv`` adapter received it; ``store_ts``/``st`` the store wrote it to Redis.
  The bench adds the simulator's change time (its control channel answers with it).
Messages (``P:msg:outbox:*`` -> transport -> ``P:msg:inbox``)
  envelope ``created`` (sender sealed and queued it into its db); ``received_ns`` (our
  transport got the bytes: MQTT on_message / HTTP handler); ``stored_ns`` (Redis TIME in
  the Lua script that accepted it into the receiver's inbox).
AMS (``ams:{participant}:...``)
  flexibility hash: ``created_ns``, ``received_ns``, ``stored_ns``; activation hash:
  ``sent_ns`` (AMS queued the Activation Notification); settlement: the verification's
  ``created_ns``/``received_ns``/``stored_ns``.
MGMS control path (``P:flex:act:{id}`` hash, ``P:cmd:log``)
  activation ``created_ns``/``received_ns``/``stored_ns``/``handled_ns``; per command
  ``sent_ts`` (first frame out), ``ack_ts`` (ACTCON), ``confirm_ts`` (status confirmed);
  ``verified_ns`` (verification queued).

The probes cost one clock read per hop and are always on; the bench itself adds nothing to
the paths it measures except reading the results back.

Nothing is imported here: ``mgms --help`` must not load c104, libiec61850 and gurux. The
entry points are :func:`gateway.bench.args.add_arguments` and :func:`gateway.bench.runner.run`.
"""
