"""Notifications of deploy outcomes: generic webhook, Slack-compatible chat, commit status (GitHub, Gitea,
GitLab). ``outcomes`` decides what is worth telling, ``render`` builds each destination's request, ``notifier``
delivers them off the deploy's path."""

from deployerd.notify.notifier import Notifier
from deployerd.notify.outcomes import Deduper, Notice, Outcome, notice_of

__all__ = ["Deduper", "Notice", "Notifier", "Outcome", "notice_of"]
