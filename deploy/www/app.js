// shardlog history page: plain files from the same NGINX server (deploy/nginx/shardlog.conf).
// ?topic=chat/room42 opens a topic (?dir=<directory path> for a hashed name), &back=N loads N
// older segments at once. Everything from the tree is shown with textContent, never as HTML.
"use strict";

const DATA = "/";          // where the tree is served (the page itself lives at /+www/)
const POLL_MS = 3000;      // live refresh of +recent.json (a 304 while its ETag holds)
const SEGMENT = /^\+log\.(?:(\d+)\.)?jsonl(?:\.gz)?$/;  // +log.jsonl, +log.NNNNNNNN.jsonl[.gz]

// Topic -> directory path, as shardlog.topics.topic_to_relpath: %XX (UTF-8) for % + # \ and
// control characters, "%" for an empty level, %2E and %2E%2E for . and .. (a level over 255
// bytes is hashed by the recorder: reach it through the subtopic list, ?dir=).
const hex = (c) => Array.from(new TextEncoder().encode(c), (b) => "%" + b.toString(16).toUpperCase().padStart(2, "0")).join("");
const encodeLevel = (l) => l === "" ? "%" : l === "." ? "%2E" : l === ".." ? "%2E%2E"
  : l.replace(/[%+#\\\x00-\x1f\x7f-\x9f]/g, hex);
const topicToDir = (topic) => topic.split("/").map(encodeLevel).join("/");
// ... and back, for display (a hashed name stays as it is)
const decodeName = (n) => n === "%" ? "" : n.includes("%~") ? n
  : n.replace(/(?:%[0-9A-F]{2})+/g, (run) => { try { return decodeURIComponent(run); } catch { return run; } });
const dirToTopic = (dir) => dir.split("/").map(decodeName).join("/");
// Directory path -> URL: the `%` of an escape is itself percent-encoded in a URL (docs/deploy.md)
const dirUrl = (dir) => DATA + (dir ? dir.split("/").map(encodeURIComponent).join("/") + "/" : "");

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; };

const state = { dir: "", records: [], keys: new Set(), etag: null, loaded: new Set(), timer: null };

function status(text) { $("status").textContent = text; }

function fmtTime(ts) {  // ts: microseconds since the epoch -> "2026-11-22 16:20:01.123456 UTC"
  const iso = new Date(Math.floor(ts / 1000)).toISOString();
  return iso.slice(0, 10) + " " + iso.slice(11, 23) + String(ts % 1000).padStart(3, "0") + " UTC";
}

function renderRecord(r) {
  const li = el("li", "rec");
  const head = el("div", "head");
  const t = el("time", null, fmtTime(r.ts));
  t.dateTime = new Date(Math.floor(r.ts / 1000)).toISOString();
  head.append(t, el("span", "meta", "qos " + r.qos + (r.retain ? " · retained" : "")));
  let pre;
  if (r.enc === "base64") {
    head.append(el("span", "badge", "base64"));
    pre = el("pre", "payload b64", r.payload);
  } else if (r.enc === "utf8") {
    pre = el("pre", "payload text", r.payload);
  } else {
    pre = el("pre", "payload json", JSON.stringify(r.payload, null, 2));
  }
  li.append(head, pre);
  return li;
}

function merge(list) {
  let added = 0;
  for (const r of list) {
    if (!r || typeof r.ts !== "number") continue;
    const key = JSON.stringify(r);
    if (state.keys.has(key)) continue;
    state.keys.add(key);
    state.records.push(r);
    added++;
  }
  if (!added) return;
  state.records.sort((a, b) => a.ts - b.ts);  // stable: equal times keep their file order
  const ol = $("records");
  const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 4;
  ol.replaceChildren(...state.records.map(renderRecord));
  if (atBottom && state.loaded.size === 0) window.scrollTo(0, document.body.scrollHeight);
}

async function listing() {  // NGINX JSON autoindex: [{name, type, mtime, size}]
  const r = await fetch(dirUrl(state.dir), { cache: "no-store" });
  if (!r.ok) return null;
  return r.json();
}

// Segments newest first: +log.jsonl, then +log.NNNNNNNN.jsonl by falling number. A compressed
// one is fetched by its .jsonl name (NGINX gzip_static answers with Content-Encoding: gzip).
function segments(entries) {
  const segs = new Map();
  for (const e of entries) {
    const m = e.type === "file" && SEGMENT.exec(e.name);
    if (m) segs.set(e.name.replace(/\.gz$/, ""), m[1] === undefined ? Infinity : Number(m[1]));
  }
  return [...segs].sort((a, b) => b[1] - a[1]).map(([name]) => name);
}

function showSubtopics(entries) {
  const ul = $("subtopics");
  ul.replaceChildren();
  for (const e of entries.filter((e) => e.type === "directory").sort((a, b) => a.name.localeCompare(b.name))) {
    const dir = state.dir ? state.dir + "/" + e.name : e.name;
    const a = el("a", null, decodeName(e.name) === "" ? "(empty level)" : decodeName(e.name));
    a.href = dir.includes("%~") ? "?dir=" + encodeURIComponent(dir) : "?topic=" + encodeURIComponent(dirToTopic(dir));
    const li = el("li");
    li.append(a);
    ul.append(li);
  }
  $("subtopics-box").hidden = !ul.children.length;
}

function showCrumbs() {
  const nav = $("crumbs");
  nav.replaceChildren();
  const root = el("a", null, "(all topics)");
  root.href = "?";
  nav.append(root);
  if (!state.dir) return;
  const names = state.dir.split("/");
  names.forEach((n, i) => {
    const dir = names.slice(0, i + 1).join("/");
    const a = el("a", null, decodeName(n) || "(empty)");
    a.href = dir.includes("%~") ? "?dir=" + encodeURIComponent(dir) : "?topic=" + encodeURIComponent(dirToTopic(dir));
    nav.append(" / ", a);
  });
}

async function poll() {
  if (!state.dir) return;
  const headers = state.etag ? { "If-None-Match": state.etag } : {};
  try {
    const r = await fetch(dirUrl(state.dir) + "+recent.json", { cache: "no-store", headers });
    if (r.status === 304) return;
    if (!r.ok) { if (!state.records.length) status("No recent messages (" + r.status + ")."); return; }
    state.etag = r.headers.get("ETag");
    merge(await r.json());
    if (state.records.length) status(state.records.length + " messages shown");
  } catch (err) {
    status("Could not fetch +recent.json: " + err);
  }
}

async function older() {
  const entries = await listing();  // listed again each time: the current segment may have rotated
  if (!entries) return false;
  const next = segments(entries).find((n) => !state.loaded.has(n));
  if (!next) { $("older").hidden = true; return false; }
  state.loaded.add(next);
  const r = await fetch(dirUrl(state.dir) + next);
  if (r.ok) {
    const recs = [];
    for (const line of (await r.text()).split("\n")) {
      if (!line) continue;
      try { recs.push(JSON.parse(line)); } catch { /* a line being appended */ }
    }
    merge(recs);
  }
  const left = segments(entries).filter((n) => !state.loaded.has(n)).length;
  $("older").hidden = left === 0;
  status(state.records.length + " messages shown, " + state.loaded.size + " segment(s) loaded"
         + (left ? ", " + left + " older" : ", from the first one kept"));
  return left > 0;
}

async function openDir(dir, back) {
  Object.assign(state, { dir, records: [], keys: new Set(), etag: null, loaded: new Set() });
  $("records").replaceChildren();
  $("topic").value = dir ? dirToTopic(dir) : "";
  document.title = (dir ? dirToTopic(dir) + " · " : "") + "shardlog history";
  showCrumbs();
  status("Loading…");
  const entries = await listing();
  showSubtopics(entries || []);
  if (!dir) { status("Pick a topic."); $("older").hidden = true; return; }
  if (!entries) { status("No such topic here: " + dirToTopic(dir)); $("older").hidden = true; return; }
  $("older").hidden = segments(entries).length === 0;
  await poll();
  if (!state.records.length) status("No messages yet.");
  for (let i = 0; i < back && await older(); i++);
  clearInterval(state.timer);
  state.timer = setInterval(() => { if ($("live").checked) poll(); }, POLL_MS);
}

$("pick").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const topic = $("topic").value;
  history.pushState(null, "", topic ? "?topic=" + encodeURIComponent(topic) : "?");
  openDir(topic ? topicToDir(topic) : "", 0);
});
$("older").addEventListener("click", () => older());
window.addEventListener("popstate", () => location.reload());

const params = new URLSearchParams(location.search);
const initial = params.has("dir") ? params.get("dir") : params.has("topic") ? topicToDir(params.get("topic")) : "";
openDir(initial, Math.min(Number(params.get("back")) || 0, 1000));
