"""Drive one live migration over QMP exactly as one drives QEMU's, with the qemu.qmp package.

usage: migrate.py SOURCE_QMP_SOCKET DESTINATION_URI

Connects to the source, negotiates, sets parameters and capabilities, starts `migrate`, waits
for the MIGRATION event with status `completed` (failing on `failed` or `cancelled`), then
prints one JSON line: the MIGRATION statuses seen, the number of MIGRATION_PASS events, whether
STOP was seen, and the final `query-migrate` answer. Nothing here is vmig-specific: the same
script drives QEMU; vmig's extra `x-vmig-` keys are only reported when present.
"""

import asyncio
import json
import sys

from qemu.qmp import QMPClient


async def main(socket_path: str, uri: str) -> int:
    qmp = QMPClient("migrate.py")
    await qmp.connect(socket_path)
    statuses, passes, stopped = [], 0, False
    with qmp.listener() as listener:
        await qmp.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "auto-converge", "state": True},
                ]
            },
        )
        await qmp.execute(
            "migrate-set-parameters",
            {"downtime-limit": 300, "max-bandwidth": 1 << 40},
        )
        params = await qmp.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 300, params
        await qmp.execute("migrate", {"uri": uri})
        async for event in listener:
            name = event["event"]
            if name == "MIGRATION":
                status = event["data"]["status"]
                statuses.append(status)
                if status in ("completed", "failed", "cancelled"):
                    break
            elif name == "MIGRATION_PASS":
                passes += 1
            elif name == "STOP":
                stopped = True
    info = await qmp.execute("query-migrate")
    await qmp.disconnect()
    extras = sorted(k for k in info if k.startswith("x-vmig-"))
    print(
        json.dumps(
            {
                "statuses": statuses,
                "passes": passes,
                "stopped": stopped,
                "query-migrate": info,
                "vmig-extras": extras,
            }
        )
    )
    return 0 if statuses and statuses[-1] == "completed" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 120)))
