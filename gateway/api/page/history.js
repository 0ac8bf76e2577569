// One endpoint's delivery history: every attempt, newest first, with filters; each
// attempt's detail (status, duration, error, the start of the answer) and a resend.

import {ApiError, call, newKey} from "./api.js";
import {$, cell, detailButton, h, ms, pages, time} from "./dom.js";
import {announce, clearFieldErrors, problem, running, showError, state} from "./ui.js";

const attempts = pages("history", "attempt", row);  // the table of attempts, page by page

const OUTCOMES = {
  success: "delivered", http_error: "HTTP error", timeout: "timed out", connection_error: "could not connect",
  blocked: "address refused", invalid_endpoint: "invalid endpoint", internal_error: "gateway error",
  circuit_open: "circuit open (no request)", deferred: "deferred (not an attempt)", unknown: "unknown",
};

function thenWords(next) {
  if (next === "delivered") return "delivered";
  if (next === "test") return "test";
  const [kind, rest] = [next.split(":")[0], next.split(":").slice(1).join(":")];
  if (kind === "retry") return `retry (${rest})`;
  if (kind === "dead") return `dead letter (${rest})`;
  if (kind === "deferred") return "waits for capacity";
  return next;
}

/** Empty the history for a newly opened endpoint. */
export function resetHistory() {
  const form = $("history-form");
  form.reset();
  clearFieldErrors(form);
  attempts.reset();
}

function query(more) {
  const form = $("history-form");
  return {
    endpointId: state.current, status: form.elements.status.value, since: form.elements.since.value.trim(),
    eventId: form.elements.eventId.value.trim(), limit: 50, cursor: attempts.cursor(more),
  };
}

function detail(holder, attempt) {
  holder.append(
    h("dl", {class: "facts"},
      h("dt", {}, "Event id"), h("dd", {}, h("code", {}, attempt.eventId)),
      h("dt", {}, "Attempt"), h("dd", {}, h("code", {}, attempt.id), ` in tier ${attempt.tier}`),
      h("dt", {}, "Status"), h("dd", {}, attempt.status === null ? "no HTTP answer" : String(attempt.status)),
      h("dt", {}, "Duration"), h("dd", {}, ms(attempt.durationMs)),
      attempt.error ? [h("dt", {}, "Error"), h("dd", {}, attempt.error)] : null,
      h("dt", {}, "Answer"), h("dd", {}, attempt.response ? h("pre", {class: "snippet"}, attempt.response)
        : h("span", {class: "hint"}, "empty")),
      attempt.replayOf ? [h("dt", {}, "Replay of"), h("dd", {}, h("code", {}, attempt.replayOf))] : null),
    h("button", {type: "button", class: "secondary", onclick: (event) => resend(event.currentTarget, attempt)},
      "Resend this event"));
}

function row(attempt) {
  const outcome = attempt.status !== null ? `${attempt.status}` : OUTCOMES[attempt.outcome] ?? attempt.outcome;
  return h("tr", {dataset: {attempt: attempt.id, outcome: attempt.outcome}},
    cell("When", time(attempt.at)),
    cell("Event", h("code", {}, attempt.eventType)),
    cell("Attempt", `#${attempt.number}`),
    cell("Outcome", h("span", {class: attempt.outcome === "success" ? "verdict-ok" : "verdict-bad"},
      attempt.outcome === "success" ? "✓ " : "✗ ", outcome), attempt.status !== null && attempt.outcome !== "success"
      ? ` ${OUTCOMES[attempt.outcome] ?? attempt.outcome}` : ""),
    cell("Took", ms(attempt.durationMs)),
    cell("Then", thenWords(attempt.next)),
    cell("Detail", detailButton(7, (holder) => detail(holder, attempt))));
}

export async function loadHistory(more = false) {
  if (state.current === null) return;
  const form = $("history-form");
  try {
    const {data} = await call("GET", "/v1/deliveries", {query: query(more)});
    const partial = data.completeSince ? [" (the gateway keeps attempts since ", time(data.completeSince), ")"] : "";
    attempts.show(data, more, partial);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showError(form, "history", error);
  }
}

async function resend(button, attempt) {
  await running(button, async () => {
    const {data} = await call("POST", `/v1/deliveries/${encodeURIComponent(attempt.id)}/resend`,
      {idempotencyKey: newKey()});
    announce(`Resent: event ${data.eventId} goes to the endpoint again now, through the retry tiers; its `
      + "attempts appear here.");
  }, problem);
}

export function initHistory() {
  $("history-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = event.currentTarget.querySelector("button[type=submit]");
    clearFieldErrors(event.currentTarget);
    await running(button, () => loadHistory(false));
  });
  $("history-more").addEventListener("click", () => running($("history-more"), () => loadHistory(true)));
}
