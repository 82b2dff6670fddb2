// The operator console (docs/console.md): plain script, no build step, no outside assets.
// Every number and name shown comes from the admin API and is set as text, never as HTML.
"use strict";

const TOKEN_KEY = "callscreen.token";
let me = null; // {name, role, scope, editable} from /v1/whoami

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(headers, rows, id) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {}, h)));
  const body = rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))));
  const attrs = id ? { id } : {};
  return el("table", attrs, el("thead", {}, head), el("tbody", {}, ...body));
}

function when(seconds) {
  if (!seconds) return "never";
  return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function show(text, isError) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = !text;
}

class Refused extends Error {}

async function api(method, path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {
    method,
    headers: { Authorization: "Bearer " + token, Accept: "application/json" },
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: "not JSON (status " + response.status + ")" };
  }
  const error = body && body.error ? String(body.error) : "";
  // The token itself was refused (wrong, removed by a reload, or no tokens at all).
  if (response.status === 401 || (response.status === 403 && !error.startsWith("token "))) {
    signOut("Your token was refused: " + (error || response.status));
    throw new Refused(error);
  }
  return { status: response.status, body };
}

function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  me = null;
  $("nav").hidden = true;
  for (const page of document.querySelectorAll(".page")) page.hidden = true;
  show("", false);
  $("login").hidden = false;
  const error = $("login-error");
  error.textContent = reason || "";
  error.hidden = !reason;
  $("token").value = "";
  $("token").focus();
}

async function signIn() {
  const { status, body } = await api("GET", "/v1/whoami");
  if (status !== 200) {
    signOut("Sign-in failed: " + (body.error || status));
    return;
  }
  me = body;
  $("login").hidden = true;
  $("login-error").hidden = true;
  $("nav").hidden = false;
  $("whoami").textContent = me.name + " (" + me.role + ")";
  route();
}

function route() {
  if (!me) return;
  const page = (location.hash || "#lookup").slice(1);
  const known = ["lookup", "lists", "rejections", "status"];
  const current = known.includes(page) ? page : "lookup";
  for (const name of known) $("page-" + name).hidden = name !== current;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === current);
  }
  show("", false);
  const loaders = { lists: loadLists, rejections: loadRejections, status: loadStatus };
  if (loaders[current]) loaders[current]().catch(failed);
}

function failed(error) {
  if (!(error instanceof Refused)) show("Request failed: " + error.message, true);
}

// --- look-up ------------------------------------------------------------------------
function editableNumbersLists() {
  return me.editable.filter((name) => (window.listKinds || {})[name] === "numbers");
}

async function lookUp(number) {
  const result = $("lookup-result");
  const { status, body } = await api("GET", "/v1/lookup?number=" + encodeURIComponent(number));
  result.replaceChildren();
  if (status !== 200) {
    result.append(el("p", { class: "error", id: "lookup-error" }, body.error || status));
    return;
  }
  if (!window.listKinds) await loadKinds();
  const editable = editableNumbersLists();
  result.append(el("h3", {}, "Number ", el("span", { id: "lookup-number" }, body.number)));

  result.append(el("h3", {}, "Decision by trunk group"));
  result.append(
    table(
      ["trunk group", "decision", "rule", "list", "matched"],
      body.decisions.map((d) => [
        d.trunk_group || "(POST /)",
        el("span", { class: d.decision }, d.decision + (d.on_error ? " (on_error: " + d.on_error + ")" : "")),
        d.rule,
        d.list || "-",
        d.matched || "-",
      ]),
      "decisions",
    ),
  );

  result.append(el("h3", {}, "Lists"));
  result.append(
    table(
      ["list", "kind", "holds it", ""],
      body.lists.map((l) => {
        let held = l.listed ? "yes" : "no";
        if (l.kind === "subscribers" && l.listed) {
          held = "block: " + l.block.join(", ") + "; allow: " + l.allow.join(", ");
        }
        const canRemove = l.listed && l.kind === "numbers" && editable.includes(l.list);
        const remove = canRemove
          ? el("button", { type: "button", class: "remove", "data-list": l.list, onclick: () => change("DELETE", l.list, body.number) }, "Remove")
          : "";
        return [l.list, l.kind, held, remove];
      }),
      "lists-table",
    ),
  );

  if (editable.length) {
    const select = el("select", { id: "add-list" }, ...editable.map((n) => el("option", { value: n }, n)));
    const form = el(
      "form",
      { id: "edit" },
      el("label", { htmlFor: "add-list" }, "Add to"),
      select,
      el("label", { htmlFor: "reason" }, "Reason"),
      el("input", { id: "reason", placeholder: "ticket or why", required: true }),
      el("button", { type: "submit", id: "add-button" }, "Add"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      change("PUT", select.value, body.number).catch(failed);
    });
    result.append(el("p", { class: "hint" }, "The reason goes into the audit trail (needed for a removal too)."));
    result.append(form);
  }

  result.append(el("h3", {}, "Call history"));
  if (body.calls === null) {
    result.append(el("p", { class: "hint" }, "Call history is off (history.enabled)."));
  } else {
    result.append(callsTable(body.calls, "calls"));
  }

  result.append(el("h3", {}, "Changes to its entries"));
  result.append(auditTable(body.audit, "audit"));
}

function callsTable(calls, id) {
  return table(
    ["time", "trunk group", "caller", "called", "decision", "rule", "list", "matched", "call id"],
    calls.map((c) => [
      when(c.time),
      c.trunk_group || "(POST /)",
      c.caller || "-",
      c.called || "-",
      el("span", { class: c.decision }, c.decision + (c.dry_run_matches.length ? " (dry-run match)" : "")),
      c.rule,
      c.list || "-",
      c.matched || "-",
      c.call_id || "-",
    ]),
    id,
  );
}

function auditTable(records, id) {
  return table(
    ["time", "action", "token", "client", "list", "entry / counts", "version", "reason"],
    records.map((r) => [
      when(r.time),
      r.action + (r.outcome && r.outcome !== "ok" ? " (" + r.outcome + ")" : ""),
      r.actor,
      r.client,
      r.list || "-",
      r.entry || (r.added !== undefined ? "+" + r.added + " -" + r.removed : "-"),
      r.version_before !== undefined ? r.version_before + " → " + r.version_after : "-",
      r.reason || r.detail || "",
    ]),
    id,
  );
}

async function change(method, list, number) {
  const reasonInput = $("reason");
  const reason = reasonInput ? reasonInput.value.trim() : "";
  if (!reason) {
    show("Give a reason first: it goes into the audit trail.", true);
    if (reasonInput) reasonInput.focus();
    return;
  }
  const path = "/v1/lists/" + encodeURIComponent(list) + "/entries/" + encodeURIComponent(number) + "?reason=" + encodeURIComponent(reason);
  const { status, body } = await api(method, path);
  if (status !== 200) {
    show((method === "PUT" ? "Not added: " : "Not removed: ") + (body.error || status), true);
    return;
  }
  await lookUp(number);
  show((method === "PUT" ? "Added " : "Removed ") + body.entry + (method === "PUT" ? " to " : " from ") + list + " (version " + body.version + ").", false);
}

// --- lists, rejections, status --------------------------------------------------------
async function loadKinds() {
  const { body } = await api("GET", "/v1/lists");
  window.listKinds = Object.fromEntries(body.lists.map((l) => [l.name, l.kind]));
  return body.lists;
}

async function readiness() {
  const response = await fetch("/readyz", { cache: "no-store" });
  return response.json();
}

async function lastSyncs() {
  const { body } = await api("GET", "/v1/audit?action=sync&limit=200");
  const latest = {};
  for (const record of body.records) if (!(record.list in latest)) latest[record.list] = record;
  return latest;
}

async function loadLists() {
  const [lists, ready, syncs] = await Promise.all([loadKinds(), readiness(), lastSyncs()]);
  const out = $("lists-overview");
  out.replaceChildren(
    table(
      ["list", "kind", "entries", "version", "source", "last sync", "last sync result", "health"],
      lists.map((l) => {
        const meta = l.meta || {};
        const loaded = ready.lists[l.name];
        const sync = syncs[l.name];
        const reasons = ready.reasons.filter((r) => r.includes(l.name));
        return [
          l.name,
          l.kind,
          loaded ? loaded.entries : meta.size !== undefined ? meta.size : "-",
          meta.version !== undefined ? meta.version : "-",
          l.source || meta.source || "(admin API only)",
          when(meta.synced_at),
          sync ? sync.outcome + (sync.detail ? ": " + sync.detail : "") + " at " + when(sync.time) : "-",
          el("span", { class: reasons.length ? "error" : loaded ? "ok" : "" }, reasons.length ? reasons.join("; ") : loaded ? "loaded" : "not loaded"),
        ];
      }),
      "lists-table-overview",
    ),
  );
}

async function loadRejections() {
  const out = $("rejections");
  const { status, body } = await api("GET", "/v1/history/recent?decision=reject&limit=500");
  if (status !== 200) {
    out.replaceChildren(el("p", { class: "hint" }, body.error || status));
    return;
  }
  const rules = Object.entries(body.by_rule).sort((a, b) => b[1] - a[1]);
  out.replaceChildren(
    el("h3", {}, "By rule (last " + body.calls.length + " rejections)"),
    table(["rule", "rejections"], rules, "by-rule"),
    el("h3", {}, "Latest"),
    callsTable(body.calls.slice(0, 50), "recent-calls"),
  );
}

async function loadStatus() {
  const [ready, reloads, syncs] = await Promise.all([
    readiness(),
    api("GET", "/v1/audit?action=reload&limit=10"),
    api("GET", "/v1/audit?action=sync&limit=20"),
  ]);
  const out = $("status");
  const state = ready.ready ? el("p", { class: "ok", id: "ready" }, "Ready") : el("p", { class: "error", id: "ready" }, "Not ready: " + ready.reasons.join("; "));
  const parts = [state];
  if (me.role === "admin") {
    const button = el("button", { type: "button", id: "reload" }, "Reload configuration");
    button.addEventListener("click", () => reload().catch(failed));
    parts.push(button);
  }
  parts.push(el("h3", {}, "Reloads"), auditTable(reloads.body.records, "reloads"));
  parts.push(el("h3", {}, "Syncs and accepts"), auditTable(syncs.body.records, "syncs"));
  out.replaceChildren(...parts);
}

async function reload() {
  const { status, body } = await api("POST", "/v1/reload");
  if (status === 404) show("This service has no reload route.", true);
  else if (status !== 200) show("Reload failed: " + (body.error || status), true);
  else show("Reloaded.", false);
  await loadStatus();
}

// --- wiring ---------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    signIn().catch(failed);
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookUp($("number").value.trim()).catch(failed);
  });
  window.addEventListener("hashchange", route);
  if (sessionStorage.getItem(TOKEN_KEY)) signIn().catch(failed);
  else signOut("");
});
