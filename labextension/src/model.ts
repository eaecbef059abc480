/**
 * The sidebar's state: sessions, datasets, submissions, leaderboards and the caller's balance.
 *
 * The pure part (reduction of stream events, filtering, sorting, what deserves a notification)
 * takes plain values and returns plain values, so jest tests it without a browser. The
 * {@link NSMLModel} class holds the state, talks to the service through an {@link IApi} (the
 * handler's, in JupyterLab) and tells views about changes through signals.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { ENDED_STATES, IBoard, IDataset, IMe, ISession, ISubmission, SessionState } from './tokens';
import { elapsedSeconds, hoursLeft } from './format';

// ---- pure functions --------------------------------------------------------------------------

/** One event from the server's stream, classified. */
export type StreamEvent =
  | {
      kind: 'session';
      session: string;
      state: SessionState | null;
      message: string | null;
      /** The full session, when the event carries it. */
      full: ISession | null;
    }
  | { kind: 'submission'; id: number | null; dataset: string | null; state: string | null }
  | { kind: 'credits'; balance: number | null }
  /** A notice from the service for the user (e.g. a GPU notebook server about to stop). */
  | { kind: 'notice'; level: NoticeLevel; message: string }
  /** (Re)connected, or told to reload: whatever was missed is in a fresh listing. */
  | { kind: 'hello' }
  /** The server's upstream connection to the service dropped or came back. */
  | { kind: 'status'; connected: boolean; message: string | null };

const SESSION_STATES = new Set([
  'queued',
  'preparing',
  'running',
  'completed',
  'failed',
  'oom_killed',
  'stopped',
  'lost'
]);

function asState(v: unknown): SessionState | null {
  return typeof v === 'string' && SESSION_STATES.has(v) ? (v as SessionState) : null;
}

function isObject(v: unknown): v is { [k: string]: unknown } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Classify one server-sent event (its `event:` name and parsed `data:`). The server may send
 * the service's event rows (`{session, state, message}`), whole sessions, submissions or
 * balances, under a name (`session`, `submission`, `credits`) or a `type` field; anything
 * unknown is `null` (ignored).
 */
export function classifyStreamEvent(name: string, data: unknown): StreamEvent | null {
  if (name === 'reset') {
    return { kind: 'hello' };
  }
  if (!isObject(data)) {
    return null;
  }
  const type = String(data.type ?? data.topic ?? (name && name !== 'message' ? name : ''));
  const inner = isObject(data.data) ? data.data : isObject(data.payload) ? data.payload : data;
  if (type === 'hello') {
    // The service's greeting, relayed: the connection's own open event already refreshed.
    return null;
  }
  if (type === 'status') {
    return {
      kind: 'status',
      connected: inner.connected === true,
      message: typeof inner.message === 'string' ? inner.message : null
    };
  }
  if (type === 'notice') {
    const level = inner.level;
    const subject = typeof inner.subject === 'string' ? inner.subject : '';
    const body = typeof inner.message === 'string' ? inner.message : '';
    if (!subject && !body) {
      return null;
    }
    return {
      kind: 'notice',
      level: level === 'success' || level === 'info' || level === 'error' ? level : 'warning',
      message: subject && body ? `${subject}: ${body}` : subject || body
    };
  }
  if (type === 'credits' || type === 'credit' || type === 'balance') {
    const b = inner.balance ?? inner.credits;
    return { kind: 'credits', balance: typeof b === 'number' ? b : null };
  }
  if (type === 'submission' || type === 'submissions') {
    const sub = isObject(inner.submission) ? inner.submission : inner;
    return {
      kind: 'submission',
      id:
        typeof sub.id === 'number'
          ? sub.id
          : typeof sub.submission === 'number'
            ? sub.submission
            : null,
      dataset: typeof sub.dataset === 'string' ? sub.dataset : null,
      state: typeof sub.state === 'string' ? sub.state : null
    };
  }
  // A session: an event row names it in `session`; a whole session carries `name` + `resources`.
  const full =
    isObject(inner.session) && typeof inner.session.name === 'string' ? inner.session : null;
  if (full || (typeof inner.name === 'string' && isObject(inner.resources))) {
    const s = (full ?? inner) as unknown as ISession;
    return {
      kind: 'session',
      session: s.name,
      state: asState(s.state),
      message: s.message,
      full: s
    };
  }
  if (typeof inner.session === 'string') {
    // The service's session events carry the event (state, message) and the session's
    // present state ("now"); the present state wins (a replayed old event must not rewind).
    const now = isObject(inner.now) ? inner.now : null;
    const msg = now && typeof now.message === 'string' ? now.message : inner.message;
    return {
      kind: 'session',
      session: inner.session,
      state: asState(now?.state) ?? asState(inner.state),
      message: typeof msg === 'string' ? msg : null,
      full: null
    };
  }
  return null;
}

/**
 * The sessions after one stream event: a whole session replaces its row; a state change
 * updates the row's state (a session not listed yet is left to the refetch the caller does).
 */
export function reduceSessions(
  sessions: ReadonlyMap<string, ISession>,
  event: StreamEvent
): Map<string, ISession> {
  const next = new Map(sessions);
  if (event.kind !== 'session') {
    return next;
  }
  if (event.full) {
    next.set(event.full.name, event.full);
    return next;
  }
  const row = next.get(event.session);
  if (row && event.state && row.state !== event.state) {
    // An ended session never goes back to running through a late event.
    if (!(
      ENDED_STATES.has(row.state) &&
      !ENDED_STATES.has(event.state) &&
      event.state !== 'queued'
    )) {
      next.set(event.session, {
        ...row,
        state: event.state,
        message: event.message ?? row.message
      });
    }
  }
  return next;
}

export interface ISessionFilter {
  /** Substring of name, user, team, entry, arguments, memo, node or state. */
  text: string;
  /** 'all', 'active' (queued, preparing, running), 'ended', or one state. */
  state: string;
  /** 'all' (mine and my teams'), 'mine', or 'team' (my teammates' sessions). */
  owner: SessionOwner;
}

export type SessionOwner = 'all' | 'mine' | 'team';

export const DEFAULT_FILTER: ISessionFilter = { text: '', state: 'all', owner: 'all' };

export function filterSessions(
  sessions: Iterable<ISession>,
  filter: ISessionFilter,
  me: string | null
): ISession[] {
  const text = filter.text.trim().toLowerCase();
  const out: ISession[] = [];
  for (const s of sessions) {
    if (filter.owner === 'mine' && s.user !== me) {
      continue;
    }
    if (filter.owner === 'team' && s.user === me) {
      continue;
    }
    const ended = ENDED_STATES.has(s.state);
    if (filter.state === 'active' && ended) {
      continue;
    }
    if (filter.state === 'ended' && !ended) {
      continue;
    }
    if (!['all', 'active', 'ended'].includes(filter.state) && s.state !== filter.state) {
      continue;
    }
    if (text) {
      const hay = [s.name, s.user, s.team ?? '', s.entry, s.args.join(' '), s.memo]
        .concat([s.node ?? '', s.state])
        .join(' ')
        .toLowerCase();
      if (!hay.includes(text)) {
        continue;
      }
    }
    out.push(s);
  }
  return out;
}

export type SortKey = 'created' | 'name' | 'state' | 'elapsed' | 'gpus' | 'credits' | 'metric';

/** Credits charged for a session so far (`credits_used`), or null when not reported. */
export function sessionCredits(s: ISession): number | null {
  return typeof s.credits_used === 'number' ? s.credits_used : null;
}

/** Credits an hour a running session costs (`credit_rate`); null when it does not run. */
export function sessionRate(s: ISession): number | null {
  return typeof s.credit_rate === 'number' && s.state === 'running' ? s.credit_rate : null;
}

/**
 * Whose a session is, for its row: null for one of mine without a team; otherwise the owner
 * when it is not me and the team it belongs to (`bob · team vision`, `team vision`).
 */
export function sessionOwnerLabel(s: ISession, me: string | null): string | null {
  const parts: string[] = [];
  if (s.user !== me) {
    parts.push(s.user);
  }
  if (s.team) {
    parts.push(`team ${s.team}`);
  }
  return parts.length ? parts.join(' · ') : null;
}

/** The actions a session's row offers the caller (`me`; null: not known yet). */
export interface ISessionActions {
  stop: boolean;
  remove: boolean;
  submit: boolean;
  logs: boolean;
  fork: boolean;
}

/**
 * What the caller may do with a session: the owner (and an admin) stops a running one,
 * removes an ended one and submits it; a team admin of the session's team stops it too;
 * anyone who sees it (a teammate) reads its log and forks it. While the caller is not known
 * yet, every action is offered (the service refuses what it must).
 */
export function sessionActions(s: ISession, me: IMe | null): ISessionActions {
  const ended = ENDED_STATES.has(s.state);
  const owns = me === null || s.user === me.name || me.admin;
  const leads =
    !!s.team && s.visibility !== 'private' && (me?.team_admin_of ?? []).includes(s.team);
  return {
    stop: (owns || leads) && !ended,
    remove: owns && ended,
    submit: owns && s.datasets.length > 0,
    logs: true,
    fork: true
  };
}

/** Mean utilisation now of the session's GPUs (percent), or null when none reported. */
export function gpuUseNow(s: ISession): number | null {
  const vals = (s.gpu_use ?? [])
    .map(g => g.utilization_pct)
    .filter((v): v is number => typeof v === 'number');
  return vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null;
}

/** Seconds the session has run (or waited, while queued) at `now`. */
export function sessionElapsed(s: ISession, now: number): number | null {
  if (s.duration_s !== null && s.duration_s !== undefined && ENDED_STATES.has(s.state)) {
    return s.duration_s;
  }
  return elapsedSeconds(s.started ?? s.created, s.finished, now);
}

const STATE_ORDER: { [s: string]: number } = {
  running: 0,
  preparing: 1,
  queued: 2,
  failed: 3,
  oom_killed: 4,
  lost: 5,
  stopped: 6,
  completed: 7
};

/** Session number N of USER/DATASET/N (names sort by it, not as text). */
function sessionNumber(name: string): number {
  const n = Number(name.slice(name.lastIndexOf('/') + 1));
  return isNaN(n) ? 0 : n;
}

/**
 * Sessions sorted by `key` (descending when `desc`); ties keep the newest first. `metric`
 * sorts by the last value of `metric` (sessions without it last, whatever the order).
 */
export function sortSessions(
  sessions: readonly ISession[],
  key: SortKey,
  desc: boolean,
  now: number,
  metric = ''
): ISession[] {
  const value = (s: ISession): number | string | null => {
    switch (key) {
      case 'name':
        return `${s.name.slice(0, s.name.lastIndexOf('/'))}/${String(sessionNumber(s.name)).padStart(10, '0')}`;
      case 'state':
        return STATE_ORDER[s.state] ?? 99;
      case 'elapsed':
        return sessionElapsed(s, now);
      case 'gpus':
        return s.resources.gpus;
      case 'credits':
        return sessionCredits(s);
      case 'metric': {
        const v = s.last_metrics[metric];
        return typeof v === 'number' ? v : null;
      }
      default:
        return Date.parse(s.created) || 0;
    }
  };
  const sign = desc ? -1 : 1;
  return [...sessions].sort((a, b) => {
    const va = value(a);
    const vb = value(b);
    if (va === null && vb !== null) {
      return 1;
    }
    if (vb === null && va !== null) {
      return -1;
    }
    if (va !== null && vb !== null && va !== vb) {
      return (va < vb ? -1 : 1) * sign;
    }
    return (Date.parse(b.created) || 0) - (Date.parse(a.created) || 0) || b.id - a.id;
  });
}

export type NoticeLevel = 'success' | 'info' | 'warning' | 'error';

export interface INotice {
  level: NoticeLevel;
  message: string;
  /** The session the notice is about (its action opens it), if any. */
  session: string | null;
}

/** Whether `s` was stopped because its owner's credits ran out. */
export function stoppedForCredits(s: Pick<ISession, 'state' | 'reason' | 'message'>): boolean {
  return s.state === 'stopped' && /credit/i.test(`${s.reason ?? ''} ${s.message ?? ''}`);
}

/**
 * What to tell the user when one of their sessions goes from `before` (undefined: not seen
 * before) to `after`: ended, failed, OOM-killed, stopped for credits, lost. Nothing for a
 * session first seen already ended (a page load), for other users' sessions, or while it runs.
 */
export function sessionNotice(
  before: ISession | undefined,
  after: ISession,
  me: string | null
): INotice | null {
  if (after.user !== me || !ENDED_STATES.has(after.state)) {
    return null;
  }
  if (!before || before.state === after.state) {
    return null;
  }
  const why = after.message ? `: ${after.message}` : '';
  const name = after.name;
  switch (after.state) {
    case 'completed':
      return { level: 'success', message: `${name} completed`, session: name };
    case 'oom_killed':
      return { level: 'error', message: `${name} was killed: out of memory${why}`, session: name };
    case 'failed':
      return { level: 'error', message: `${name} failed${why}`, session: name };
    case 'lost':
      return { level: 'error', message: `${name} was lost${why}`, session: name };
    case 'stopped':
      if (stoppedForCredits(after)) {
        return {
          level: 'warning',
          message: `${name} was stopped: credits ran out${why}`,
          session: name
        };
      }
      return { level: 'info', message: `${name} stopped`, session: name };
    default:
      return null;
  }
}

/**
 * The caller's burn rate in credits an hour: the service's `burn_rate`, else (a service
 * that does not report it) the sum of `credit_rate` over my running sessions.
 */
export function burnRate(me: IMe | null, sessions: Iterable<ISession>): number | null {
  if (typeof me?.burn_rate === 'number') {
    return me.burn_rate;
  }
  let sum = 0;
  let any = false;
  for (const s of sessions) {
    const r = sessionRate(s);
    if (r !== null && (!me || s.user === me.name)) {
      sum += r;
      any = true;
    }
  }
  return any ? sum : null;
}

/** Whether the balance is low: under `minBalance`, or lasting less than `minHours`. */
export function creditsLow(
  balance: number,
  ratePerHour: number | null,
  minBalance: number,
  minHours: number
): boolean {
  if (balance < minBalance) {
    return true;
  }
  const h = hoursLeft(balance, ratePerHour);
  return h !== null && h < minHours;
}

/** A push, pull or run the sidebar started. */
export interface IJob {
  id: string;
  label: string;
  /** 0..1, or null while the total is unknown. */
  fraction: number | null;
  phase: string;
  state: 'running' | 'done' | 'failed';
  message: string;
}

/** The fraction done of a progress report (null when the total is not known yet). */
export function progressFraction(done: number, total: number): number | null {
  if (!total || total <= 0) {
    return null;
  }
  return Math.min(1, Math.max(0, done / total));
}

// ---- the stateful model ------------------------------------------------------------------------

/** How the model reaches the service (the handler's `requestAPI`, or a test double). */
export interface IApi {
  get<T>(path: string): Promise<T>;
  post<T>(path: string, body?: unknown): Promise<T>;
  del(path: string): Promise<void>;
}

/** The sessions listing the sidebar asks for: mine and those of my teams, newest first. */
export const SESSIONS_LISTING = 'sessions?limit=200&teams=1';

/** Encode USER/DATASET/N for a URL path, each part on its own. */
export function sessionPath(name: string): string {
  return name
    .split('/')
    .map(p => encodeURIComponent(p))
    .join('/');
}

export class NSMLModel {
  constructor(api: IApi, options: { now?: () => number } = {}) {
    this._api = api;
    this.now = options.now ?? (() => Date.now());
  }

  readonly now: () => number;

  get me(): IMe | null {
    return this._me;
  }
  get sessions(): ReadonlyMap<string, ISession> {
    return this._sessions;
  }
  get datasets(): readonly IDataset[] {
    return this._datasets;
  }
  get submissions(): readonly ISubmission[] {
    return this._submissions;
  }
  get boards(): ReadonlyMap<string, IBoard> {
    return this._boards;
  }
  /** The last error talking to the service, for the panel to show (null when fine). */
  get error(): string | null {
    return this._error;
  }
  /** Whether the live stream is connected. */
  get live(): boolean {
    return this._live;
  }
  set live(v: boolean) {
    if (v !== this._live) {
      this._live = v;
      this._changed.emit();
    }
  }

  /** Emitted after any change of the state. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }
  /** Emitted when something deserves a notification. */
  get notice(): ISignal<this, INotice> {
    return this._notice;
  }

  /** The caller's burn rate in credits an hour (null: nothing running or not reported). */
  get burnRate(): number | null {
    return burnRate(this._me, this._sessions.values());
  }

  async refreshMe(): Promise<void> {
    this._me = await this._call(() => this._api.get<IMe>('me'), this._me);
    this._changed.emit();
  }

  /** Mine and my teams' sessions (`teams=1`; a service without teams ignores it). */
  async refreshSessions(): Promise<void> {
    const res = await this._call(
      () => this._api.get<{ sessions: ISession[] }>(SESSIONS_LISTING),
      null
    );
    if (res) {
      this._mergeSessions(res.sessions, true);
    }
  }

  async refreshSession(name: string): Promise<void> {
    const s = await this._call(
      () => this._api.get<ISession>(`sessions/${sessionPath(name)}`),
      null
    );
    if (s) {
      this._mergeSessions([s], false);
    }
  }

  async refreshDatasets(): Promise<void> {
    const res = await this._call(() => this._api.get<{ datasets: IDataset[] }>('datasets'), null);
    if (res) {
      this._datasets = res.datasets;
      this._changed.emit();
    }
  }

  async refreshSubmissions(): Promise<void> {
    const res = await this._call(
      () => this._api.get<{ submissions: ISubmission[] }>('submissions'),
      null
    );
    if (res) {
      this._submissions = res.submissions;
      this._changed.emit();
    }
  }

  async refreshBoard(dataset: string): Promise<void> {
    const b = await this._call(
      () => this._api.get<IBoard>(`datasets/${encodeURIComponent(dataset)}/leaderboard`),
      null
    );
    if (b) {
      this._boards = new Map(this._boards).set(dataset, b);
      this._changed.emit();
    }
  }

  async refreshAll(): Promise<void> {
    await Promise.all([
      this.refreshMe(),
      this.refreshSessions(),
      this.refreshDatasets(),
      this.refreshSubmissions()
    ]);
  }

  /** Apply one event of the stream; refetch what the event names but does not carry. */
  async applyStreamEvent(event: StreamEvent): Promise<void> {
    switch (event.kind) {
      case 'hello':
        // (Re)connected: whatever happened while disconnected is in a fresh listing.
        await this.refreshAll();
        return;
      case 'status':
        this.live = event.connected;
        if (event.connected) {
          await this.refreshAll();
        }
        return;
      case 'notice':
        this._notice.emit({ level: event.level, message: event.message, session: null });
        return;
      case 'credits':
        if (event.balance !== null && this._me) {
          this._me = { ...this._me, credits: event.balance };
          this._changed.emit();
          this._checkCredits();
        }
        await this.refreshMe();
        return;
      case 'submission':
        await this.refreshSubmissions();
        if (event.dataset) {
          const name = event.dataset.split('@')[0];
          if (this._boards.has(name)) {
            await this.refreshBoard(name);
          }
        }
        return;
      case 'session': {
        if (!this._sessions.has(event.session)) {
          // Started elsewhere (the CLI, a magic) and first seen through the stream: it is
          // new, so its end deserves a notice even if it ended before the refetch.
          this._streamNew.add(event.session);
        }
        const next = reduceSessions(this._sessions, event);
        this._setSessions(next);
        if (!event.full) {
          await this.refreshSession(event.session);
        }
        return;
      }
    }
  }

  async stop(name: string): Promise<void> {
    const s = await this._api.post<ISession>(`sessions/${sessionPath(name)}/stop`);
    this._mergeSessions([s], false);
  }

  async remove(name: string): Promise<void> {
    await this._api.del(`sessions/${sessionPath(name)}`);
    const next = new Map(this._sessions);
    next.delete(name);
    this._sessions = next;
    this._changed.emit();
  }

  async fork(
    name: string,
    edits: { args?: string[]; checkpoint?: string | null; gpus?: number; memo?: string }
  ): Promise<ISession> {
    const child = await this._api.post<ISession>(`sessions/${sessionPath(name)}/fork`, edits);
    this._mergeSessions([child], false);
    return child;
  }

  async submit(name: string, checkpoint?: string): Promise<ISubmission> {
    const sub = await this._api.post<ISubmission>('submissions', {
      session: name,
      ...(checkpoint ? { checkpoint } : {})
    });
    this._submissions = [...this._submissions, sub];
    this._changed.emit();
    return sub;
  }

  private _mergeSessions(list: ISession[], whole: boolean): void {
    const next = whole ? new Map<string, ISession>() : new Map(this._sessions);
    for (const s of list) {
      next.set(s.name, s);
    }
    this._setSessions(next);
  }

  private _setSessions(next: Map<string, ISession>): void {
    const before = this._sessions;
    this._sessions = next;
    if (this._loaded) {
      for (const [name, s] of next) {
        // A session not seen before is new if the stream announced it or it was created
        // after the first listing (started elsewhere while the stream's upstream was down).
        const isNew = this._streamNew.has(name) || (Date.parse(s.created) || 0) > this._loadedAt;
        const seen = before.get(name) ?? (isNew ? { ...s, state: 'queued' as const } : undefined);
        const n = sessionNotice(seen, s, this._me?.name ?? null);
        const key = `${name} ${s.state}`;
        if (n && !this._notified.has(key)) {
          this._notified.add(key);
          this._notice.emit(n);
        }
        if (before.has(name) || ENDED_STATES.has(s.state)) {
          this._streamNew.delete(name);
        }
      }
    }
    if (!this._loaded) {
      this._loadedAt = this.now();
    }
    this._loaded = true;
    this._changed.emit();
    this._checkCredits();
  }

  /** Transfers and runs in progress (push, pull, run), shown with a progress bar. */
  get jobs(): readonly IJob[] {
    return this._jobs;
  }

  /** Add or update a job (by its id); a finished one stays until {@link dropJob}. */
  setJob(job: IJob): void {
    const i = this._jobs.findIndex(j => j.id === job.id);
    this._jobs = i < 0 ? [...this._jobs, job] : this._jobs.map(j => (j.id === job.id ? job : j));
    this._changed.emit();
  }

  dropJob(id: string): void {
    this._jobs = this._jobs.filter(j => j.id !== id);
    this._changed.emit();
  }

  /** Thresholds of the low-credit warning (from the settings). */
  lowCredit = { balance: 10, hours: 1 };

  private _checkCredits(): void {
    if (!this._me) {
      return;
    }
    const low = creditsLow(
      this._me.credits,
      this.burnRate,
      this.lowCredit.balance,
      this.lowCredit.hours
    );
    if (low && !this._warnedLow) {
      const rate = this.burnRate;
      const left = hoursLeft(this._me.credits, rate);
      this._notice.emit({
        level: 'warning',
        message:
          `NSML credits are running low: ${this._me.credits.toFixed(2)} left` +
          (left !== null ? ` (about ${(left * 60).toFixed(0)} min at the current rate)` : ''),
        session: null
      });
    }
    this._warnedLow = low;
  }

  private async _call<T>(f: () => Promise<T>, fallback: T): Promise<T> {
    try {
      const v = await f();
      if (this._error !== null) {
        this._error = null;
        this._changed.emit();
      }
      return v;
    } catch (e) {
      this._error = e instanceof Error ? e.message : String(e);
      this._changed.emit();
      return fallback;
    }
  }

  private _api: IApi;
  private _me: IMe | null = null;
  private _sessions: Map<string, ISession> = new Map();
  private _datasets: IDataset[] = [];
  private _submissions: ISubmission[] = [];
  private _boards: Map<string, IBoard> = new Map();
  private _error: string | null = null;
  private _jobs: IJob[] = [];
  private _streamNew = new Set<string>();
  private _loadedAt = Infinity;
  private _notified = new Set<string>();
  private _live = false;
  private _loaded = false;
  private _warnedLow = false;
  private _changed = new Signal<this, void>(this);
  private _notice = new Signal<this, INotice>(this);
}
