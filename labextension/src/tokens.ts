/**
 * The shapes the NSML service answers (its OpenAPI document, `nsml_server/schemas.py`) and the
 * identifiers the extension shares: plugin id, command ids, the stream's event kinds.
 */

/** Plugin id; also the settings schema's name (`schema/plugin.json`). */
export const PLUGIN_ID = 'jupyter-nsml-lab:plugin';

/** Command ids (the palette shows their labels under "NSML"). */
export namespace CommandIDs {
  export const showSessions = 'nsml:show-sessions';
  export const runFile = 'nsml:run-file';
  export const openSession = 'nsml:open-session';
  export const showLogs = 'nsml:show-logs';
  export const compare = 'nsml:compare';
  export const pushFolder = 'nsml:push-folder';
  export const refresh = 'nsml:refresh';
}

export type SessionState =
  'queued' | 'preparing' | 'running' | 'completed' | 'failed' | 'oom_killed' | 'stopped' | 'lost';

/** States after which a session never changes again (but for resume). */
export const ENDED_STATES: ReadonlySet<string> = new Set([
  'completed',
  'failed',
  'oom_killed',
  'stopped',
  'lost'
]);

export interface IQueue {
  position: number | null;
  code: string | null;
  reason: string | null;
}

export interface IGpuUse {
  index?: string | number;
  utilization_pct?: number | null;
  memory_used_mib?: number | null;
}

export type MetricValue = number | 'nan' | 'inf' | '-inf' | null;

/** One session (`SessionOut`). */
export interface ISession {
  name: string;
  id: number;
  user: string;
  state: SessionState;
  visibility: 'private' | 'team' | 'public';
  entry: string;
  args: string[];
  image: string;
  datasets: string[];
  resources: { gpus: number; gpu_models: string[]; cpu: number; memory_mib: number };
  node: string | null;
  gpu_ids: string[];
  gpu_use: IGpuUse[];
  exit_code: number | null;
  reason: string | null;
  message: string | null;
  queue: IQueue | null;
  stop_requested: boolean;
  parent: string | null;
  parent_checkpoint: string | null;
  memo: string;
  last_step: number | null;
  last_metrics: { [name: string]: MetricValue };
  created: string;
  started: string | null;
  finished: string | null;
  duration_s: number | null;
  /** Credits charged for it so far (null: nothing charged yet; absent from older services). */
  credits_used?: number | null;
  /** Credits an hour it costs while it runs (null: not billed). */
  credit_rate?: number | null;
  /** The team the session is shared with (its members list it with `teams=1`), or null. */
  team?: string | null;
}

/** The caller (`MeOut`). */
export interface IMe {
  name: string;
  admin: boolean;
  credits: number;
  groups: string[];
  /** Credits an hour the caller's running work burns now (absent from older services). */
  burn_rate?: number;
  /** The teams whose admin the caller is: they may stop those teams' sessions. */
  team_admin_of?: string[];
}

export interface IVersion {
  version: number;
  ref: string;
  files: number;
  bytes: number;
  created: string;
  created_by: string;
  last_access: string | null;
}

export interface IDataset {
  name: string;
  owner: string;
  visibility: 'private' | 'team' | 'public';
  team: string | null;
  scope: 'mine' | 'team' | 'public' | 'admin';
  versions: number;
  latest: number | null;
  bytes: number;
  total_bytes: number;
  leaderboard: { metric?: string | null; higher_is_better?: boolean | null } | null;
  created: string;
  last_access: string | null;
  version_list?: IVersion[];
}

export type SubmissionState = 'queued' | 'running' | 'scored' | 'failed' | 'stopped';

export interface ISubmission {
  id: number;
  dataset: string;
  user: string;
  session: string;
  checkpoint: string;
  state: SubmissionState;
  score: number | null;
  message: string | null;
  submitted: string;
  finished: string | null;
}

export interface IBoardRow {
  rank: number;
  user: string;
  session: string;
  checkpoint: string;
  submission: number;
  score: number | null;
  public_score: number;
  submitted: string;
  mine: boolean;
}

export interface IBoard {
  dataset: string;
  metric: string | null;
  higher_is_better: boolean | null;
  closed: boolean;
  rows: IBoardRow[];
}

export interface ILogChunk {
  offset: number;
  next_offset: number;
  size: number;
  text: string;
  complete: boolean;
}

export interface ICheckpoint {
  session: string;
  name: string;
  size: number;
  step: number | null;
  created: string;
}

/** What the extension's settings hold (`schema/plugin.json`). */
export interface ISidebarSettings {
  /** 'live': the event stream plus a slow refresh; 'manual': only the refresh button. */
  refresh: 'live' | 'manual';
  /** Seconds between the slow refreshes of GPU use and metrics (live mode). */
  refreshSeconds: number;
  tabs: { sessions: boolean; datasets: boolean; leaderboards: boolean };
  notifications: boolean;
  /** Warn when the balance lasts less than this many hours at the current burn rate. */
  lowCreditHours: number;
  /** ... or falls below this many credits. */
  lowCreditBalance: number;
}

export const DEFAULT_SETTINGS: ISidebarSettings = {
  refresh: 'live',
  refreshSeconds: 30,
  tabs: { sessions: true, datasets: true, leaderboards: true },
  notifications: true,
  lowCreditHours: 1,
  lowCreditBalance: 10
};
