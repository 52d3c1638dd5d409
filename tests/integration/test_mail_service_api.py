"""The plug-in contract the helper core uses, in-process: parse_config, start, submit, the
shim's in-process sendmail, stats, flush, close."""

from __future__ import annotations

import asyncio
import smtplib

import pytest
from chroot_helper.errors import MailListenError, SubmitError
from chroot_helper.services.mail import MailStats, format_stats, parse_config, start
from mail_fixtures import DOMAIN, free_port, run_sink, simple_message


def test_start_submit_stats_close(tmp_path):
    with run_sink(tmp_path) as sink:
        port = free_port()
        config = parse_config(
            {
                "listen": [f"127.0.0.1:{port}", f"unix:{tmp_path}/smtp.sock"],
                "spool": str(tmp_path / "spool"),
                "relay": f"smtp://{sink.address}",
                "domain": DOMAIN,
                "max_size": "16K",
            }
        )

        def smtp_submit() -> str:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.ehlo()
                smtp.mail(f"app@{DOMAIN}")
                smtp.rcpt("a@example.net")
                return smtp.data(simple_message("api-smtp"))[1].decode()

        async def scenario():
            service = await start(config)
            try:
                assert service.addresses == [f"127.0.0.1:{port}", f"unix:{tmp_path}/smtp.sock"]
                reply = await asyncio.to_thread(smtp_submit)
                assert reply.startswith("2.0.0 Ok: queued as ")
                queue_id = await service.submit(
                    sender=f"app@{DOMAIN}",
                    recipients=["b@example.net"],
                    data=simple_message("api-submit"),
                )
                with pytest.raises(SubmitError) as denied:
                    await service.submit(
                        sender="x@evil.example", recipients=["b@example.net"], data=b"S: x\r\n\r\n"
                    )
                assert denied.value.code == 553
                with pytest.raises(SubmitError) as injected:
                    await service.submit(
                        sender=f"app@{DOMAIN}",
                        recipients=["b@example.net"],
                        data=b"Subject: a\nBcc: c@example.net\r\n\r\nx\r\n",
                    )
                assert injected.value.code == 550
                code, err = await service.sendmail(
                    ["-t", "-i"],
                    b"From: app@example.org\nTo: shim@example.net\nX-Token: api-shim\n\nx\n",
                )
                assert (code, err) == (0, "")
                code, err = await service.sendmail(["-f", "a@evil.example", "c@x.net"], b"x\n")
                assert code == 77 and "5.7.1" in err
                code, err = await service.sendmail(
                    ["c@x.net"], b"From: app@example.org\n\n" + (b"y" * 900 + b"\n") * 20
                )
                assert code == 65 and "552 5.3.4" in err
                with pytest.raises(MailListenError, match="already in use"):
                    await start(config)
                await asyncio.to_thread(sink.wait_token, "api-shim")
                await asyncio.to_thread(sink.wait_token, "api-submit")
                await asyncio.to_thread(sink.wait_token, "api-smtp")
                for _ in range(200):
                    if not service.runner.schedule:
                        break
                    await asyncio.sleep(0.05)
                assert service.flush() == 0
                return queue_id, service.stats()
            finally:
                await service.close()
                await service.close()  # idempotent

        queue_id, stats = asyncio.run(scenario())
        assert f"id {queue_id}" in sink.wait_token("api-submit")[0].header("Received")
    assert isinstance(stats, MailStats)
    assert (stats.received, stats.delivered, stats.queued) == (3, 3, 0)
    assert stats.rejected == 4
    assert "received=3" in format_stats(stats)
    assert not (tmp_path / "smtp.sock").exists()  # the socket is removed at close
