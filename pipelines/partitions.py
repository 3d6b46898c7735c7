"""The two dynamic partition sets: one partition per template id and one per render request id.

Partitions are added by the sensors (from the store's ``templates/`` and ``requests/`` prefixes) and by
``musetalk submit`` (through GraphQL, before its request object is uploaded).
"""

import dagster as dg

templates = dg.DynamicPartitionsDefinition(name="templates")
render_requests = dg.DynamicPartitionsDefinition(name="render_requests")
