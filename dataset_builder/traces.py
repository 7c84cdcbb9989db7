"""Stage 5: a teacher writes each question's reasoning trace and attempt. Failures are retried by
the backend and then recorded in `trace_error`; the item stays in the table (and in the funnel)
but the selection skips it. Trace length is counted with the target model's tokenizer."""

from dataclasses import dataclass, field

from .backends import Reply
from .cache import ResultCache, content_key


@dataclass
class TraceWriter:
    teacher: object
    tokenizer: object  # the model that will be trained on the traces
    cache: ResultCache = field(default_factory=lambda: ResultCache(None))
    batch_size: int = 64
    failures: int = 0

    def __call__(self, data):
        questions = data["question"]
        keys = [content_key("trace", self.teacher.name, q) for q in questions]
        todo = [i for i, k in enumerate(keys) if self.cache.get(k) is None]
        replies: dict[int, Reply] = {}
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            answered = self.teacher.chat([[{"role": "user", "content": questions[i]}] for i in chunk],
                                         progress=f"traces, {self.teacher.name}: {start + len(chunk)}/{len(todo)}")
            self.cache.put_many({keys[i]: dict(r.__dict__) for i, r in zip(chunk, answered) if not r.error})
            replies.update(zip(chunk, answered))
        for i, k in enumerate(keys):
            if i not in replies:
                replies[i] = Reply(**self.cache.get(k))
        ordered = [replies[i] for i in range(len(questions))]
        for reply in ordered:  # an empty trace or answer teaches nothing: a failure, recorded like any other
            if not reply.error and not reply.reasoning.strip():
                reply.error = "the teacher returned no reasoning"
            elif not reply.error and not reply.content.strip():
                reply.error = "the teacher returned no answer"
        self.failures = sum(1 for r in ordered if r.error)
        lengths = [len(self.tokenizer(r.reasoning, add_special_tokens=False).input_ids) if not r.error else 0 for r in ordered]
        data = data.add_column("thinking_trajectory", [r.reasoning for r in ordered])
        data = data.add_column("attempt", [r.content for r in ordered])
        data = data.add_column("trace_error", [r.error for r in ordered])
        return data.add_column("trace_tokens", lengths)
