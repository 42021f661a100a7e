// opspawn dashboard: the little the server-rendered pages need a script for.
// Every action is a same-origin fetch with a JSON body (the HTTP guard takes no form posts);
// every live part swaps in HTML the server rendered from the same templates as the page.
"use strict";

const REFRESH_EVERY_MS = 2000;

function flash(message) {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.hidden = !message;
}

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json, text/html" },
    body: JSON.stringify(body ?? {}),
  });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) {
      // not a problem document: keep the status line
    }
    throw new Error(detail);
  }
  return response;
}

function act(handler) {
  return async (event) => {
    event.preventDefault();
    flash("");
    try {
      await handler(event);
    } catch (error) {
      flash(error.message);
    }
  };
}

function setSummary(html) {
  const summary = document.getElementById("task-summary");
  if (summary) summary.innerHTML = html;
}

// -- forms and buttons ------------------------------------------------------------------

// A form of one field: post it as {field: value}, then go where the answer's `key` says.
function postForm(id, field, key) {
  const form = document.getElementById(id);
  if (!form) return;
  form.addEventListener("submit", act(async () => {
    const value = form.querySelector(`[name=${field}]`).value;
    const answer = await (await post(form.dataset.url, { [field]: value })).json();
    window.location.assign(answer[key]);
  }));
}

function wireForms() {
  postForm("sign-in", "token", "next");
  postForm("new-task", "goal", "url");
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const actions = { "sign-out": signOut, cancel: cancel, answer: answer };
    const handler = actions[button.dataset.action];
    if (handler) act(() => handler(button))(event);
  });
}

async function signOut(button) {
  const answer = await (await post(button.dataset.url)).json();
  window.location.assign(answer.next);
}

async function cancel(button) {
  button.disabled = true;
  setSummary(await (await post(button.dataset.url)).text());
}

async function answer(button) {
  const note = document.getElementById("approval-note");
  const body = {
    request_id: button.dataset.requestId,
    approve: button.dataset.approve === "true",
    note: note && note.value ? note.value : null,
  };
  button.disabled = true;
  setSummary(await (await post(button.dataset.url, body)).text());
}

// -- live parts -------------------------------------------------------------------------

// Every element with data-refresh="<url>" is replaced, every few seconds while the tab is
// visible, by the fragment the server renders at that URL (the task list, the servers).
function refreshParts() {
  for (const part of document.querySelectorAll("[data-refresh]")) {
    let busy = false;
    window.setInterval(async () => {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const response = await fetch(part.dataset.refresh, { credentials: "same-origin" });
        if (response.ok) {
          part.innerHTML = await response.text();
          flash("");
        } else {
          flash(`This page could not be refreshed (${response.status}); reload it.`);
        }
      } catch (_) {
        flash("The server cannot be reached; this page is not live until it is back.");
      } finally {
        busy = false;
      }
    }, REFRESH_EVERY_MS);
  }
}

function followTimeline() {
  const timeline = document.getElementById("timeline");
  if (!timeline || !timeline.dataset.stream) return;
  const source = new EventSource(timeline.dataset.stream);
  source.addEventListener("open", () => {
    timeline.dataset.live = "open";
  });
  source.addEventListener("item", (message) => {
    const holder = document.createElement("template");
    holder.innerHTML = message.data.trim();
    const row = holder.content.firstElementChild;
    if (row && !document.getElementById(row.id)) timeline.append(row);
  });
  source.addEventListener("summary", (message) => setSummary(message.data));
  source.addEventListener("problem", (message) => {
    source.close();
    timeline.dataset.live = "ended";
    flash(JSON.parse(message.data).detail);
  });
  source.addEventListener("end", () => {
    source.close();
    timeline.dataset.live = "ended";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  wireForms();
  refreshParts();
  followTimeline();
});
